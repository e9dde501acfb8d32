"""`sweep`: finds a better lr than a bad start, prunes a trial that falls behind, records a
failing trial and goes on, and continues an interrupted sweep from its sqlite storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.errors import SweepError
from peftkit.recipe.load import load_recipe
from peftkit.sweep import sweep, trial
from tests.conftest import chat_rows, write_jsonl, write_recipe

BAD_LR = 1e-7  # Adam moves each weight by ~lr per step: 1e-7 leaves the eval loss where it started


@pytest.fixture
def toy(tmp_path, tiny_model, chat_file):
    """A recipe for the tiny model with eval data, evaluated every 2 of 6 steps."""
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(8, seed=99))

    def make(lr: float, max_steps: int = 6) -> Path:
        return write_recipe(
            tmp_path / "recipe.yaml",
            tiny_model,
            chat_file,
            data={"train": str(chat_file), "eval": str(evals), "max_length": 128},
            train={"max_steps": max_steps, "eval_every": 2, "lr": lr},
        )

    return make


def _space(path: Path, params: dict[str, Any], **settings: Any) -> Path:
    path.write_text(yaml.safe_dump({"params": params, "seed": 0, **settings}))
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_finds_a_better_lr_than_a_bad_start(tmp_path, toy):
    space = _space(
        tmp_path / "space.yaml",
        {"train.lr": {"type": "float", "low": 3e-3, "high": 5e-2, "log": True}},
        pruner="none",
    )
    result = sweep(toy(lr=BAD_LR), space, trials=4, out_dir=tmp_path / "sweep")

    by_number = {r.number: r for r in result.trials}
    assert sorted(by_number) == [0, 1, 2, 3]
    start, best = by_number[0], result.best
    assert start.baseline and start.params == {"train.lr": BAD_LR}  # trial 0: the recipe as given
    assert all(r.state == "complete" for r in result.trials)
    assert best.params["train.lr"] != BAD_LR
    assert best.value < start.value - 0.5  # nats per token: far beyond run-to-run noise
    assert best.value == min(r.value for r in result.trials)

    best_recipe = load_recipe(result.best_recipe)
    assert best_recipe.train.lr == best.params["train.lr"]
    assert best_recipe.train.max_steps == 6 and best_recipe.run_dir == str(tmp_path / "run")
    assert (result.best_recipe.read_text().splitlines()[0]).startswith("# peftkit train ")

    lines = _jsonl(tmp_path / "sweep" / "trials.jsonl")
    assert [line["number"] for line in lines] == [0, 1, 2, 3]
    assert all(line["steps"] == 6 and line["seconds"] > 0 for line in lines)
    for line in lines:  # each trial trained in its own folder with its own lr
        trained = load_recipe(Path(line["run_dir"]) / "recipe.yaml")
        assert trained.train.lr == line["params"]["train.lr"]
    table = (tmp_path / "sweep" / "results.md").read_text()
    rows = [row for row in table.splitlines() if row.startswith("| ") and "complete" in row]
    assert len(rows) == 4 and rows[0].split(" | ")[1] == str(best.number)  # best first
    assert (tmp_path / "sweep" / "logs" / "trial-000.log").read_text().strip()
    page = (tmp_path / "sweep" / "report.html").read_text()  # the trials compared, best first
    names = [Path(line["run_dir"]).name for line in lines]
    assert sorted(names, key=page.index) == [Path(r.run_dir).name for r in result.trials]


def test_pruning_stops_a_trial_that_falls_behind(tmp_path, toy):
    space = _space(
        tmp_path / "space.yaml",
        {"train.lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True}},
        pruner={"type": "median", "startup_trials": 1},
    )
    # Trial 0 (the recipe, a good lr) runs to the end; trial 1 (a bad lr) is behind at its first
    # evaluation and must stop there.
    result = sweep(
        toy(lr=2e-2, max_steps=8),
        space,
        trials=2,
        out_dir=tmp_path / "sweep",
        enqueue=[{"train.lr": BAD_LR}],
    )
    good, bad = sorted(result.trials, key=lambda r: r.number)
    assert good.state == "complete" and good.steps == 8
    assert bad.state == "pruned" and bad.steps == 2 and "step 2" in bad.error
    assert bad.best_eval_loss > good.best_eval_loss
    assert result.study.trials[1].state.name == "PRUNED"
    run = Path(bad.run_dir)
    metrics = _jsonl(run / "metrics.jsonl")
    assert max(m["step"] for m in metrics) == 2  # stopped at the step boundary after the eval
    assert not (run / "summary.json").exists()  # no final adapter claims to be a finished run
    assert load_recipe(result.best_recipe).train.lr == 2e-2


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, toy):
    # max_length 2 validates but leaves no supervised token: the trial stops with a DataError.
    space = _space(
        tmp_path / "space.yaml",
        {"data.max_length": {"type": "categorical", "choices": [128, 2]}},
        pruner="none",
        objective="final_eval_loss",
    )
    result = sweep(
        toy(lr=1e-2), space, trials=2, out_dir=tmp_path / "sweep", enqueue=[{"data.max_length": 2}]
    )
    ok, failed = sorted(result.trials, key=lambda r: r.number)
    assert ok.state == "complete" and failed.state == "failed"
    assert "no train row has any supervised token" in failed.error
    assert result.best.number == 0 and load_recipe(result.best_recipe).data.max_length == 128
    assert "failed" in result.table and "supervised token" in result.table
    assert _jsonl(tmp_path / "sweep" / "trials.jsonl")[1]["state"] == "failed"


def test_an_interrupted_sweep_continues_from_its_storage(tmp_path, toy, monkeypatch):
    space = _space(
        tmp_path / "space.yaml",
        {"train.lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True}},
        pruner="none",
    )
    recipe, out, db = toy(lr=1e-2, max_steps=4), tmp_path / "sweep", tmp_path / "study.db"
    real_train = trial.train  # what each trial calls

    def ctrl_c_in_trial_1(recipe, *args, on_step=None, **kwargs):
        def step(n: int, metrics: dict[str, Any]) -> None:
            if "trial-001" in recipe.run_dir:
                raise KeyboardInterrupt  # as if pressed during step 1 of trial 1
            on_step(n, metrics)

        return real_train(recipe, *args, on_step=step, **kwargs)

    monkeypatch.setattr(trial, "train", ctrl_c_in_trial_1)
    with pytest.raises(SweepError, match=r"interrupted during trial 1.*same command to continue"):
        sweep(recipe, space, trials=2, out_dir=out, storage=db)
    assert [line["state"] for line in _jsonl(out / "trials.jsonl")] == ["complete", "interrupted"]
    monkeypatch.undo()

    with pytest.raises(SweepError, match="already holds results"):  # not without its storage
        sweep(recipe, space, trials=2, out_dir=out)
    result = sweep(recipe, space, trials=2, out_dir=out, storage=db)
    states = {r.number: r.state for r in result.trials}
    assert states == {0: "complete", 1: "interrupted", 2: "complete"}  # 0 kept, 1 replaced by 2
    assert result.trials[0].params != result.trials[1].params
    assert len(_jsonl(out / "trials.jsonl")) == 3
