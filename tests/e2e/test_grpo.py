"""GRPO end to end on the tiny model: it learns what its reward asks for, a resumed run equals an
uninterrupted one, 2 processes equal 1, and bad input is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftkit import api
from peftkit.cli import main
from peftkit.errors import DataError, RecipeError, TrainingStopped
from peftkit.recipe.load import load_recipe
from tests.conftest import train_in_two_processes, write_jsonl, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore")

REWARDS = '''
def target_share(completions, completion_ids, target, **kwargs):
    """1 when the completion's first token id has the row's target parity (a column), else 0."""
    return [float(bool(ids) and ids[0] % 2 == target[i]) for i, ids in enumerate(completion_ids)]
'''


def _rows(n: int, target: int) -> list[dict]:
    # prompts of one length: no left padding, so 1 and 2 processes batch them alike
    return [
        {"prompt": f"Say something about item {chr(97 + i)}:", "target": target} for i in range(n)
    ]


def _recipe(tmp_path: Path, tiny_model: Path, out: str, **train) -> Path:
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = write_jsonl(tmp_path / "prompts.jsonl", _rows(12, target=0))
    evals = write_jsonl(tmp_path / "held.jsonl", _rows(4, target=0))
    return write_recipe(
        tmp_path / f"{out}.yaml",
        tiny_model,
        data,
        data={"train": str(data), "eval": str(evals), "max_length": 64},
        objective={
            "type": "grpo",
            "rewards": [{"function": "rewards.py:target_share"}],
            "num_generations": 4,
            "max_completion_length": 6,
            "loss_type": "grpo",
            "beta": 0.04,
        },
        train={
            "max_steps": 8,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 3e-2,
            "scheduler": "constant",
            "warmup_steps": 0,
            **train,
        },
        output={"dir": str(tmp_path / out), "plot": False},
    )


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_a_grpo_step_moves_the_policy_toward_its_advantages(tmp_path, tiny_model):
    """One optimizer step on the step's own rollouts raises sum_i A_i (log p(o_i) after - before):
    completions with a positive advantage became likelier, the others less likely."""
    import torch

    from peftkit.objectives.grpo_losses import completion_logps
    from peftkit.training.loop import FineTuneRun

    recipe = _recipe(tmp_path, tiny_model, "dir", max_steps=1, lr=1e-3)
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    seen = []  # (batch, summed log-probs of its completions before the update)
    prepare = run.objective.prepare_step
    model = run.accelerator.unwrap_model(run.model)

    def summed_logps(b):
        args = (b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])
        with torch.no_grad():
            return (completion_logps(model, *args, 1.0) * b["completion_mask"]).sum(-1)

    def recording(model_, batches, acc, step):
        out = prepare(model_, batches, acc, step)
        was = model.training
        model.eval()
        seen.extend((b, summed_logps(b)) for b in out)  # the weights the rollouts came from
        model.train(was)
        return out

    run.objective.prepare_step = recording
    run.train()
    model.eval()
    gain = 0.0
    for b, before in seen:
        gain += float((b["advantages"] * (summed_logps(b) - before)).sum())
    assert any(float(b["advantages"].abs().sum()) > 0 for b, _ in seen)
    assert gain > 0, gain


def test_grpo_logs_trl_metrics_and_keeps_completions(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model, "run", max_steps=3, eval_every=3)
    summary = api.train(recipe)
    records = _records(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    for key in (
        "reward",
        "reward_std",
        "rewards/target_share/mean",
        "rewards/target_share/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "clip_ratio/region_mean",
        "kl",
    ):
        assert key in steps[0], key
    assert 0 <= steps[0]["reward"] <= 1 and steps[0]["completions/max_length"] <= 6
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 3]  # held-out reward before and after
    assert all(r["eval_loss"] == -r["eval_reward"] for r in evals)
    g = summary["grpo"]
    assert g["eval_reward_before"] == evals[0]["eval_reward"]
    assert g["train_reward_first"] == steps[0]["reward"]
    assert g["shared_prefix"] is True  # each group's prompt ran once in the training forward
    lines = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    samples = [json.loads(x) for x in lines]
    assert [s["step"] for s in samples] == [1, 2, 3]
    assert "target_share" in samples[0]["samples"][0]["rewards"]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def test_a_resumed_grpo_run_equals_an_uninterrupted_one(tmp_path, tiny_model):
    full = _recipe(tmp_path, tiny_model, "full", save_every=2, keep_last=10, max_steps=6)
    api.train(full)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for name in ("step-0000004", "step-0000006"):
        shutil.rmtree(crashed / "checkpoints" / name)
    shutil.rmtree(crashed / "adapter")
    resumed = _recipe(tmp_path, tiny_model, "crashed", save_every=2, keep_last=10, max_steps=6)
    api.train(resumed, resume=True)
    assert _losses(crashed) == _losses(tmp_path / "full")
    ours, theirs = _adapter(crashed), _adapter(tmp_path / "full")
    assert all((ours[k] == theirs[k]).all() for k in theirs)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_model):
    one = _recipe(tmp_path, tiny_model, "one", max_steps=3, lr=1e-2)
    api.train(one)
    two = _recipe(tmp_path, tiny_model, "two", max_steps=3, lr=1e-2, micro_batch_size=1)
    # 2 processes x 1 prompt x 2 micro-batches = the same 4 prompts per step as 1 x 2 x 2
    train_in_two_processes(two, "train.micro_batch_size=1")
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    ours, theirs = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst < 1e-5, worst


def test_bad_grpo_input_is_named(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model, "bad")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok", "target": 1}, {"question": "x"}])
    with pytest.raises(DataError, match=r"prompts.jsonl.* line 2: missing 'prompt'"):
        api.train(load_recipe(recipe))
    with pytest.raises(RecipeError, match=r"train\.packing: objective grpo rolls out padded"):
        load_recipe(recipe, ["train.packing=true"])
    write_jsonl(tmp_path / "prompts.jsonl", _rows(12, target=0))
    with pytest.raises(RecipeError, match=r"objective.rewards\[0\].function: no file"):
        api.train(load_recipe(recipe, ["objective.rewards=[{function: nowhere.py:f}]"]))

    (tmp_path / "rewards.py").write_text("def target_share(completions, **k):\n    return [1.0]\n")
    with pytest.raises(TrainingStopped, match="reward 'target_share' returned 1 values for 8"):
        api.train(load_recipe(recipe, ["output.dir=" + str(tmp_path / "bad2")]))
    assert main(["plan", str(recipe)]) == 2  # named refusal, not a traceback
