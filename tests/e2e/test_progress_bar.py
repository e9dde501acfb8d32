"""The training loop's progress bar: evaluations and checkpoints are labelled phases of their own
and count in neither its rate nor its ETA."""

from __future__ import annotations

import logging
import time

from peftkit import api
from peftkit.training import loop, progress
from tests.conftest import chat_rows, write_jsonl, write_recipe


def test_bar_rate_counts_training_steps_only_and_labels_the_phases_between(
    tmp_path, tiny_model, chat_file, monkeypatch, caplog
):
    slow = 1000.0  # every evaluation "takes" this long on the clock the bar could read
    offset = [0.0]
    bars: list[progress.TrainingBar] = []
    labels: list[str] = []

    class Recorded(progress.TrainingBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    evaluate = loop.FineTuneRun.evaluate

    def slow_evaluate(self, rows=None):
        labels.append(bars[-1].desc if bars and self.bar is not None else "")
        offset[0] += slow
        return evaluate(self, rows)

    monkeypatch.setattr(loop, "TrainingBar", Recorded)
    monkeypatch.setattr(
        loop, "StepClock", lambda: progress.StepClock(now=lambda: time.perf_counter() + offset[0])
    )
    monkeypatch.setattr(loop.FineTuneRun, "evaluate", slow_evaluate)
    caplog.set_level(logging.INFO, logger="peftkit")
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(6, seed=3))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        data={"train": str(chat_file), "eval": str(evals), "max_length": 128},
        train={"max_steps": 4, "eval_every": 2, "save_every": 2},
    )
    summary = api.train(recipe)
    (bar,) = bars
    figures = bar.format_dict
    assert figures["n"] == summary["steps"] == 4
    # evaluations at steps 0 and 2 happened during the bar, yet its clock holds the steps only
    assert figures["elapsed"] < slow
    assert figures["elapsed"] == bar.clock.seconds
    assert abs(figures["elapsed"] - summary["train_seconds"]) < 0.01
    assert figures["rate"] == 4 / bar.clock.seconds
    assert labels[:2] == ["eval loss on 6 held-out rows"] * 2  # the bar's label meanwhile
    lines = caplog.messages
    for line in (
        "step 0: eval loss on 6 held-out rows ...",
        "step 2: eval loss on 6 held-out rows ...",
        "step 2: saving checkpoint step-0000002 ...",
    ):
        assert line in lines
