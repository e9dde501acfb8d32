"""`train.packing: false` with length grouping (the default `group_by_length`) trains every
objective: supervised fine-tuning, each preference objective and a task head. For pairs the
grouping reorders a step's pairs by length; the step's loss is a sum over pairs, so the run equals
the ungrouped one. And a preference run's summary shows the step-0 evaluation as "before"."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import chat_rows, labeled_rows, write_jsonl, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore")

STEPS = 3


def _pairs(n: int) -> list[dict]:
    """Answers of different lengths, so that grouping by length reorders them."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        turn = [{"role": "user", "content": f"What is {a} + {b}?"}]
        pad = " ".join(["so"] * rng.randint(0, 6))
        rows.append(
            {
                "prompt": turn,
                "chosen": [{"role": "assistant", "content": f"It is {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"I think {pad} maybe {a + b + 1}."}],
            }
        )
    return rows


def _run(tmp_path: Path, model: Path, name: str, rows: list[dict], **sections) -> FineTuneRun:
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    train = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3}
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        model,
        data,
        output={"dir": str(tmp_path / name), "plot": False},
        **{**sections, "train": {**train, **sections.get("train", {})}},
    )
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    run.train()
    run.finish()
    return run


def _losses(run: FineTuneRun) -> list[float]:
    records = [json.loads(x) for x in run.run.metrics.read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


CASES = {
    "sft": ({}, "chats"),
    "dpo": ({"objective": {"type": "dpo"}}, "pairs"),
    "orpo": ({"objective": {"type": "orpo"}}, "pairs"),
    "kto": ({"objective": {"type": "kto"}}, "pairs"),
    "simpo": ({"objective": {"type": "simpo"}}, "pairs"),
    "classification": ({"task": {"type": "classification"}}, "labeled"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unpacked_length_grouped_batches_train_every_objective(tmp_path, tiny_model, case):
    sections, kind = CASES[case]
    rows = {"chats": chat_rows(16), "pairs": _pairs(16), "labeled": labeled_rows(16, 0)}[kind]
    run = _run(tmp_path, tiny_model, case, rows, train={"packing": False}, **sections)
    losses = _losses(run)
    assert len(losses) == STEPS and all(x == x and x > 0 for x in losses)
    grouped = run.objective.lengths is not None
    assert grouped == (case != "kto")  # KTO's KL rows pair neighbours: its order is kept


def test_grouped_pairs_train_as_the_ungrouped_ones(tmp_path, tiny_model):
    rows = _pairs(16)
    grouped = _run(tmp_path, tiny_model, "grouped", rows, objective={"type": "dpo"},
                   train={"packing": False})  # fmt: skip
    plain = _run(tmp_path, tiny_model, "plain", rows, objective={"type": "dpo"})
    assert grouped.objective.lengths is not None and plain.objective.lengths is None
    plan = grouped.plan
    order = plan.epoch_order(0)
    assert [list(m) for m in plan.micro_batches(order, 0, 0, grouped.objective.lengths)] != [
        list(m) for m in plan.micro_batches(order, 0, 0, None)
    ]  # the grouping did reorder the pairs
    assert _losses(grouped) == pytest.approx(_losses(plain), abs=1e-5)


def test_summary_shows_the_step_0_preference_figures_as_before(tmp_path, tiny_model, caplog):
    rows = _pairs(24)
    data = write_jsonl(tmp_path / "eval.jsonl", rows[16:])
    with caplog.at_level(logging.INFO, logger="peftkit"):
        run = _run(tmp_path, tiny_model, "summary", rows[:16], objective={"type": "dpo"},
                   data={"eval": str(data)}, train={"max_steps": 4, "lr": 2e-2})  # fmt: skip
    assert run.recipe.train.eval_every is None
    assert not any(c.wants_start_eval for c in run.callbacks)  # no other step-0 eval
    records = [json.loads(x) for x in run.run.metrics.read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    p = json.loads(run.run.summary.read_text())["preference"]
    assert p["eval_accuracies_before"] == evals[0]["eval_rewards/accuracies"] == 0.0
    assert p["eval_margins_before"] == evals[0]["eval_rewards/margins"] == 0.0
    assert p["eval_accuracies_after"] == evals[-1]["eval_rewards/accuracies"] > 0
    after = f"{p['eval_accuracies_after']:.1%}"
    assert f"accuracy 0.0% -> {after}" in caplog.text
