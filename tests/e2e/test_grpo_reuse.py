"""GRPO rollout reuse end to end (objective.num_iterations, steps_per_generation): a generation
serves its cycle of steps, the steps that reuse it are trained with the ratio to the kept
log-probs, and a run resumed inside a cycle (its rollouts read back from the run) equals an
uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest

from peftkit import api
from peftkit.errors import RecipeError
from peftkit.recipe.load import load_recipe
from tests.e2e.test_grpo import _adapter, _losses, _recipe, _records

pytestmark = pytest.mark.filterwarnings("ignore")

REUSE = ["objective.num_iterations=2", "objective.steps_per_generation=4"]  # k=2 slices, cycle 4


def _reuse_recipe(tmp_path, tiny_model, out, **train):
    return load_recipe(_recipe(tmp_path, tiny_model, out, **train), REUSE)


def test_a_generation_serves_its_cycle(tmp_path, tiny_model):
    recipe = _reuse_recipe(tmp_path, tiny_model, "run", max_steps=6)
    summary = api.train(recipe)
    steps = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 6
    samples = [
        json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in samples] == [1, 5]  # rolled out at steps 1 and 5 only
    # steps 1 and 3 train on slice 0 of the first generation, 2 and 4 on slice 1
    assert steps[0]["reward"] == steps[2]["reward"] and steps[1]["reward"] == steps[3]["reward"]
    assert steps[0]["loss"] != steps[2]["loss"]  # the policy moved between the two passes
    assert summary["grpo"]["shared_prefix"] is True
    buffers = sorted(p.name for p in (tmp_path / "run" / "state" / "rollouts").iterdir())
    assert buffers == ["step-0000004-0.safetensors"]  # no checkpoint needs the first any more


def test_a_run_resumed_inside_a_cycle_equals_an_uninterrupted_one(tmp_path, tiny_model):
    full = _reuse_recipe(tmp_path, tiny_model, "full", save_every=1, keep_last=10, max_steps=6)
    api.train(full)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for step in range(4, 7):  # the newest kept: step 3, the cycle's last step
        shutil.rmtree(crashed / "checkpoints" / f"step-{step:07d}")
    shutil.rmtree(crashed / "adapter")
    for buffer in (crashed / "state" / "rollouts").glob("step-0000004-*"):
        buffer.unlink()  # what a run stopped at step 3 would hold
    resumed = _reuse_recipe(
        tmp_path, tiny_model, "crashed", save_every=1, keep_last=10, max_steps=6
    )
    api.train(resumed, resume=True)
    assert _losses(crashed) == _losses(tmp_path / "full")
    ours, theirs = _adapter(crashed), _adapter(tmp_path / "full")
    assert all((ours[k] == theirs[k]).all() for k in theirs)


def test_steps_per_generation_must_fill_whole_steps(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model, "bad")
    with pytest.raises(
        RecipeError,
        match=r"steps_per_generation 3: .* multiple of train\.grad_accum \(2\): set 2 or 4",
    ):
        load_recipe(recipe, ["objective.steps_per_generation=3"])
