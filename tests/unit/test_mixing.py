"""Multitask mixing: task names, shares, the mixed step plan, and the recipe rules around them."""

from __future__ import annotations

import numpy as np
import pytest

from peftkit.data.encode import EncodedRow
from peftkit.data.mixing import MixedStepPlan, apportion, rows_drawn, step_plan, task_shares
from peftkit.errors import RecipeError
from peftkit.recipe.load import validate_recipe
from peftkit.recipe.schema import DataSource, DataSpec

BASE = {"model": {"name": "m"}, "adapter": {"method": "lora"}}


def _rows(counts: dict[str, int]) -> list[EncodedRow]:
    ids = np.arange(4, dtype=np.int64)
    return [EncodedRow(ids, ids, f"{t}{i}", task=t) for t, n in counts.items() for i in range(n)]


def test_task_names_come_from_the_file_name_without_the_split():
    assert DataSource(path="data/skill-sort-train.jsonl").task_name == "skill-sort"
    assert DataSource(path="x/skill-sort_eval.jsonl").task_name == "skill-sort"
    assert DataSource(path="org/dataset").task_name == "dataset"
    assert DataSource(path="a.jsonl", task="qa").task_name == "qa"
    spec = DataSpec(train=["a-train.jsonl", "b-train.jsonl"], eval=["a-eval.jsonl", "b.jsonl"])
    assert [spec.eval_task(s) for s in spec.eval] == ["a", "b"]
    single = DataSpec(train=["quick-train.jsonl"], eval=["held-out.jsonl"])
    assert single.eval_task(single.eval[0]) == "quick"  # one train task: eval rows are its


def test_shares_follow_weights_and_temperature():
    counts = {"a": 100, "b": 400}
    two = ["a.jsonl", "b.jsonl"]
    assert task_shares(DataSpec(train=two), counts) == pytest.approx({"a": 0.2, "b": 0.8})
    weighted = DataSpec(
        train=[{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "weight": 1}],
        mixing={"strategy": "weights"},
    )
    assert task_shares(weighted, counts) == pytest.approx({"a": 0.75, "b": 0.25})
    for t, expected in [(1.0, 0.2), (2.0, 10 / 30), (1e6, 0.5)]:  # sqrt: 10 vs 20
        spec = DataSpec(train=two, mixing={"strategy": "temperature", "temperature": t})
        assert task_shares(spec, counts)["a"] == pytest.approx(expected, rel=1e-4)


def test_apportion_is_exact_and_within_one_row():
    for total, shares in [(32, [0.75, 0.25]), (1800, [0.5, 0.25, 0.25]), (10, [1 / 3] * 3)]:
        counts = apportion(total, shares)
        assert sum(counts) == total
        assert all(abs(c - total * s) < 1 for c, s in zip(counts, shares))


def test_mixed_plan_draws_each_epochs_quota_without_repeats_and_is_reproducible():
    rows = _rows({"small": 6, "big": 30})
    spec = DataSpec(
        train=[{"path": "small.jsonl", "weight": 1}, {"path": "big.jsonl", "weight": 1}],
        mixing={"strategy": "weights"},
    )
    plan = step_plan(rows, spec, micro_batch_size=3, grad_accum=1, world_size=2, seed=7)
    assert isinstance(plan, MixedStepPlan) and plan.quotas == (18, 18)
    assert plan.steps_per_epoch == 6  # 36 rows / 6 per step: no padding
    small = set(range(6))
    for epoch in range(3):
        order = plan.epoch_order(epoch)
        np.testing.assert_array_equal(order, plan.epoch_order(epoch))  # a function of (seed, epoch)
        assert sum(i in small for i in order) == 18  # the up-weighted small task cycles 3x
    big = [i for i in plan.epoch_order(0) if i not in small]
    assert len(big) == len(set(big)) == 18  # the down-weighted task: no repeats in an epoch
    seen = np.concatenate([plan.epoch_order(e) for e in range(5)])  # 5 x 18 = 3 x its 30 rows
    assert (np.bincount(seen, minlength=36)[6:] == 3).all()  # each drawn once per cycle
    assert rows_drawn(plan, 12)[:6].sum() == 36 and rows_drawn(plan, 12).sum() == 72
    other_seed = step_plan(rows, spec, 3, 1, 2, seed=8)
    assert not np.array_equal(other_seed.epoch_order(0), plan.epoch_order(0))


def test_concat_keeps_the_plain_step_plan():
    plan = step_plan(_rows({"a": 5, "b": 7}), DataSpec(train=["a.jsonl", "b.jsonl"]), 4, 1, 1, 0)
    assert type(plan).__name__ == "StepPlan"
    assert sorted(plan.epoch_order(0)[:12]) == list(range(12))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"train": [{"path": "a.jsonl", "weight": 2.0}]},
            r"data\.train\.0\.weight is set but data\.mixing\.strategy is concat",
        ),
        (
            {"train": [{"path": "a.jsonl", "weight": -1}, "b.jsonl"]},
            r"data\.train\.0\.weight: Input should be greater than 0",
        ),
        (
            {
                "train": [{"path": "a.jsonl", "weight": 1}, "b.jsonl"],
                "mixing": {"strategy": "weights"},
            },
            r"data\.train\.1\.weight is missing",
        ),
        (
            {"train": ["a.jsonl", "b.jsonl"], "eval": [{"path": "e.jsonl", "task": "c"}]},
            r"data\.eval\.0\.task 'c' is not a train task \(a, b\)",
        ),
        (
            {"train": ["a.jsonl"], "mixing": {"strategy": "temperature", "temperature": 2}},
            r"data\.mixing\.strategy temperature needs at least two train tasks",
        ),
        (
            {"train": ["a.jsonl", "b.jsonl"], "mixing": {"temperature": 2}},
            r"data\.mixing\.temperature is set but data\.mixing\.strategy is concat",
        ),
        (
            {"train": ["a.jsonl"], "reference": [{"path": "r.jsonl", "task": "x"}]},
            r"data\.reference\.0: task and weight do not apply",
        ),
        (
            {"train": ["a.jsonl"], "mixing": {"strategy": "uniform"}},
            r"data\.mixing\.strategy: Input should be 'concat', 'weights' or 'temperature'",
        ),
    ],
)
def test_bad_mixing_configs_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe({**BASE, "data": data})


def test_held_out_eval_rows_keep_their_task(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from peftkit.data.pipeline import prepare_data
    from tests.conftest import chat_rows, write_jsonl

    a = write_jsonl(tmp_path / "a-train.jsonl", chat_rows(20, seed=1))
    b = write_jsonl(tmp_path / "b-train.jsonl", chat_rows(20, seed=2))
    spec = DataSpec(train=[str(a), str(b)], eval_fraction=0.25)
    data = prepare_data(spec, AutoTokenizer.from_pretrained(tiny_model), seed=0)
    assert len(data.eval) == 10 and {r.task for r in data.eval} == {"a", "b"}
    for row in [*data.train, *data.eval]:
        assert row.origin.startswith(str(tmp_path / f"{row.task}-train.jsonl"))


def test_a_resolved_recipe_validates_again():
    """recipe.yaml in a run directory holds every default; resume and combine validate it."""
    from peftkit.recipe.schema import Recipe

    for data in (
        {"train": ["a.jsonl"], "reference": "r.jsonl"},
        {
            "train": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 2}],
            "mixing": {"strategy": "weights"},
        },
    ):
        dump = validate_recipe({**BASE, "data": data}).model_dump(mode="json")
        assert isinstance(validate_recipe(dump), Recipe)
