"""What a person reads while and after training: the progress bar's rate and ETA count training
steps only (evaluations and checkpoints are labelled phases of their own), and sizes and times
are in human units in the printed summary, report.html, the export card and `peftkit plan`, while
summary.json keeps the exact numbers."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from peftkit import api, units
from peftkit.cli import main
from peftkit.training import loop, progress
from peftkit.training.evaluation import Evaluator
from tests.conftest import chat_rows, write_jsonl, write_recipe

SLOW = 1000.0  # what every evaluation "takes" on the clock the bar could read


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def slow_eval_run(tiny_model, tmp_path_factory):
    """4 steps, evaluated at steps 0, 2 and 4 and checkpointed at 2 and 4, on a bar clock that
    jumps SLOW seconds whenever an evaluation starts."""
    root = tmp_path_factory.mktemp("readable")
    train = write_jsonl(root / "train.jsonl", chat_rows(24))
    evals = write_jsonl(root / "eval.jsonl", chat_rows(6, seed=3))
    recipe = write_recipe(
        root / "r.yaml",
        tiny_model,
        train,
        data={"train": str(train), "eval": str(evals), "max_length": 128},
        train={"max_steps": 4, "eval_every": 2, "save_every": 2},
        export={"samples": 2, "generate_tokens": 4},
    )
    offset = [0.0]
    seen: dict[str, list] = {"bars": [], "labels": []}

    class Recorded(progress.TrainingBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["bars"].append(self)

    evaluate = Evaluator.__call__

    def slow_evaluate(self, rows=None):
        seen["labels"].append(seen["bars"][-1].desc if seen["bars"] else None)
        offset[0] += SLOW
        return evaluate(self, rows)

    messages = _Messages()
    logger = logging.getLogger("peftkit")
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "TrainingBar", Recorded)
            mp.setattr(
                loop,
                "StepClock",
                lambda: progress.StepClock(lambda: time.perf_counter() + offset[0]),
            )
            mp.setattr(Evaluator, "__call__", slow_evaluate)
            summary = api.train(recipe)
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    return {"run": root / "run", "summary": summary, "lines": messages.lines, **seen}


def test_bar_rate_counts_training_steps_only_and_labels_the_phases_between(slow_eval_run):
    summary = slow_eval_run["summary"]
    (bar,) = slow_eval_run["bars"]
    figures = bar.format_dict
    assert figures["n"] == summary["steps"] == 4
    # evaluations at steps 0 and 2 ran while the bar was up, yet its clock holds the steps only
    assert figures["elapsed"] == bar.clock.seconds < SLOW
    assert abs(figures["elapsed"] - summary["train_seconds"]) < 0.01
    assert figures["rate"] == 4 / bar.clock.seconds
    labels = slow_eval_run["labels"]
    assert labels[:2] == ["eval loss on 6 held-out rows"] * 2  # what the bar said meanwhile
    for line in (
        "step 0: eval loss on 6 held-out rows ...",
        "step 2: eval loss on 6 held-out rows ...",
        "step 2: saving checkpoint step-0000002 ...",
        "step 4: saving checkpoint step-0000004 ...",
    ):
        assert line in slow_eval_run["lines"]


def test_summary_report_and_card_show_sizes_and_times_in_human_units(slow_eval_run, tmp_path):
    run, summary = slow_eval_run["run"], slow_eval_run["summary"]
    peak, seconds = summary["peak_memory_bytes"], summary["train_seconds"]
    on_disk = json.loads((run / "summary.json").read_text())
    assert isinstance(on_disk["peak_memory_bytes"], int) and on_disk["peak_memory_bytes"] == peak
    assert on_disk["train_seconds"] == seconds
    human_peak, human_time = units.size(peak), units.duration(seconds)
    assert re.fullmatch(r"[\d.,]+ (MiB|GiB)", human_peak) and human_time.endswith((" s", " min"))

    (printed,) = [line for line in slow_eval_run["lines"] if "peftkit run summary" in line]
    assert f"peak memory    {human_peak} ({summary['peak_memory_kind']})" in printed
    assert f"over {human_time} of training steps" in printed

    page = (run / "report.html").read_text()
    assert f"<td>peak_memory</td><td>{human_peak} ({summary['peak_memory_kind']})</td>" in page
    assert f"<td>train_time</td><td>{human_time}</td>" in page
    assert f"{peak:,}" not in page and "peak_memory_bytes" not in page

    out = tmp_path / "adapter"
    api.export(run, out, adapter_only=True, log=lambda *_: None)
    card = (out / "README.md").read_text()
    assert f"- training: {human_time} of training steps, peak memory {human_peak}" in card


def test_plan_shows_every_size_in_human_units(tiny_model, chat_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file)
    assert main(["plan", str(recipe), "--gpu-memory", "1MB"]) == 4
    out = capsys.readouterr().out
    plan = api.plan(recipe, gpu_memory="1MB")
    table = out.split("component", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    names = list(plan.estimate.parts)  # (some are several words: "allocator slack")
    assert len(table) - 1 == len(names)
    assert all(line.strip().startswith(n) for line, n in zip(table, names)), (table, names)
    for line, value in zip(table, [*plan.estimate.parts.values(), plan.estimate.total]):
        assert line.endswith(units.size(value))
    assert "does NOT fit in 1.00 MiB of GPU" in out
    advice = [line for line in out.splitlines() if line.startswith("  - ")]
    assert advice and all(re.search(r": ~[\d.,]+ (B|KiB|MiB|GiB) \(", a) for a in advice)
