"""Multitask training: rows are drawn in the stated proportions, per-task losses are logged and
add up to the overall loss, and a mixed run resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftkit import api
from peftkit.training.step import OptimizerStep
from tests.conftest import RESUME_TRAIN, chat_rows, write_jsonl, write_recipe

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tasks(tmp_path: Path, sizes: dict[str, int]) -> list[str]:
    return [
        str(write_jsonl(tmp_path / f"{name}-train.jsonl", chat_rows(n, seed=i)))
        for i, (name, n) in enumerate(sizes.items())
    ]


@pytest.mark.parametrize(
    ("mixing", "weights", "expected_share_a"),
    [
        ({"strategy": "weights"}, (3, 1), 0.75),
        ({"strategy": "temperature", "temperature": 2.0}, None, 8**0.5 / (8**0.5 + 24**0.5)),
    ],
    ids=["weights-3-1", "temperature-2"],
)
def test_rows_are_drawn_in_the_stated_proportions(
    tmp_path, tiny_model, monkeypatch, mixing, weights, expected_share_a
):
    """Task a has 8 rows, b 24 (concat would draw a 25%). Each epoch draws round(32 * share)
    rows of a task (largest remainder: off by less than one row), so over 2 epochs the count is
    within 2 rows of 64 * share."""
    drawn: list[str] = []
    step = OptimizerStep.__call__

    def counting_step(self, micro_batches, epoch):
        drawn.extend(row.task for rows in micro_batches for row in rows)
        return step(self, micro_batches, epoch)

    monkeypatch.setattr(OptimizerStep, "__call__", counting_step)
    a, b = _tasks(tmp_path, {"a": 8, "b": 24})
    train = [{"path": a}, {"path": b}]
    if weights:
        train = [{**s, "weight": w} for s, w in zip(train, weights)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        a,
        adapter=LORA,
        data={"train": train, "mixing": mixing, "max_length": 64},
        train={"epochs": 2, "max_steps": None, "micro_batch_size": 4, "lr": 1e-3},
    )
    summary = api.train(recipe)
    assert summary["steps"] == 16 and len(drawn) == 64
    assert abs(drawn.count("a") - 64 * expected_share_a) <= 2
    tasks = summary["tasks"]
    assert tasks["a"]["drawn_rows"] == drawn.count("a") and tasks["b"]["drawn_rows"] == drawn.count(
        "b"
    )
    assert tasks["a"]["expected_share"] == pytest.approx(expected_share_a, abs=1e-4)
    assert tasks["a"]["train_rows"] == 8 and tasks["b"]["train_rows"] == 24


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_per_task_losses_are_logged_and_add_up(tmp_path, tiny_model, packing):
    from transformers import AutoTokenizer

    from peftkit.data.pipeline import prepare_data
    from peftkit.recipe.load import load_recipe

    a, b = _tasks(tmp_path, {"a": 12, "b": 12})
    evals = [
        str(write_jsonl(tmp_path / f"{t}-eval.jsonl", chat_rows(n, seed=50 + n)))
        for t, n in (("a", 4), ("b", 7))
    ]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        a,
        adapter=LORA,
        data={"train": [a, b], "eval": evals, "max_length": 64},
        train={"max_steps": 4, "eval_every": 2, "lr": 1e-2, "packing": packing},
        output={"dir": str(tmp_path / "run"), "plot": True},
    )
    summary = api.train(recipe)
    run = tmp_path / "run"
    records = _records(run)
    data = prepare_data(load_recipe(recipe).data, AutoTokenizer.from_pretrained(tiny_model), 0)
    tokens = {t: sum(r.n_supervised for r in data.eval if r.task == t) for t in "ab"}
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    for r in evaluations:
        mean = sum(r[f"eval_loss/{t}"] * tokens[t] for t in "ab") / sum(tokens.values())
        assert mean == pytest.approx(r["eval_loss"], rel=1e-6)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        per_task = [r[k] for k in r if k.startswith("loss/")]
        assert per_task and min(per_task) - 1e-6 <= r["loss"] <= max(per_task) + 1e-6
    assert summary["tasks"]["b"]["final_eval_loss"] == evaluations[-1]["eval_loss/b"]
    assert summary["tasks"]["a"]["first_eval_loss"] == evaluations[0]["eval_loss/a"]
    assert summary["tasks"]["a"]["eval_rows"] == 4 and summary["tasks"]["b"]["eval_rows"] == 7
    # concat (the default): every row once per epoch, so shares follow the data sizes
    assert summary["tasks"]["a"]["expected_share"] == 0.5
    assert sum(t["drawn_rows"] for t in summary["tasks"].values()) == 16
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # no reference set: no forgetting report and no reference metrics
    assert "forgetting" not in summary and not any("reference_loss" in r for r in records)


def _losses(run: Path) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")}
        for r in _records(run)
        if "loss" in r
    }


def test_a_resumed_multitask_run_gives_the_same_losses(tmp_path, tiny_model):
    a, b = _tasks(tmp_path, {"a": 6, "b": 10})

    def recipe(out: str) -> Path:
        return write_recipe(
            tmp_path / f"{out}.yaml",
            tiny_model,
            a,
            adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # RNG matters
            data={
                "train": [a, b],
                "mixing": {"strategy": "temperature", "temperature": 3.0},
                "max_length": 64,
            },
            train={
                **RESUME_TRAIN,
                "packing": False,  # the padded path of per-task losses
            },
            output={"dir": str(tmp_path / out), "plot": False},
        )

    api.train(recipe("full"))
    reference = _losses(tmp_path / "full")
    assert len(reference) == 8 and all(len(v) > 1 for v in reference.values())
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for name in ("step-0000006", "step-0000008"):
        shutil.rmtree(crashed / "checkpoints" / name)
    shutil.rmtree(crashed / "adapter")
    (crashed / "summary.json").unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")  # steps 1-6 were logged
    summary = api.train(recipe("crashed"), resume=True)
    assert _losses(crashed) == reference
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["tasks"] == full_summary["tasks"]
