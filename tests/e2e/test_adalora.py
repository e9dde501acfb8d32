"""AdaLoRA trains as peft's own flow does (forward with the orthogonality penalty, optimizer step,
`update_and_allocate(step)`, zero_grad): same weights and the same rank pattern; its penalty is
peft's; the run's step count is peft's `total_step`; sharded launches, --resume and GGUF adapters
are refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftkit.cli import main
from peftkit.errors import RecipeError
from peftkit.launch import Launch
from peftkit.recipe.launch_rules import launch_problems
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from peftkit.training.optim import build_optimizer, build_scheduler
from tests.conftest import chat_rows, write_jsonl, write_recipe

ADALORA = {
    "method": "adalora",
    "init_r": 6,
    "target_r": 3,
    "tinit": 1,
    "tfinal": 2,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
}
STEPS = 7  # step 0..1 warm-up, 2..4 pruning, 5 the final allocation, 6 masked to the pattern
TRAIN = {
    "max_steps": STEPS,
    "micro_batch_size": 4,
    "lr": 2e-2,
    "warmup_steps": 0,
    "max_grad_norm": None,
    "packing": False,
}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The peftkit run, and a copy of its model at step 0 trained by peft's own flow on the same
    micro-batches (returns recipe, trained run, reference model)."""
    root = tmp_path_factory.mktemp("adalora")
    data = write_jsonl(root / "d.jsonl", chat_rows(16, seed=5))
    recipe = load_recipe(
        write_recipe(
            root / "r.yaml",
            tiny_model,
            data,
            adapter=ADALORA,
            train=TRAIN,
            output={"dir": str(root / "run"), "plot": False},
        )
    )
    run = FineTuneRun(recipe)
    run.setup()
    reference = copy.deepcopy(run.accelerator.unwrap_model(run.model))
    batches = []  # the run's own micro-batches, step by step
    for step in range(STEPS):
        epoch, in_epoch = divmod(step, run.plan.steps_per_epoch)
        order = run.plan.epoch_order(epoch)
        rows = run.plan.micro_batches(order, in_epoch, 0, run.objective.lengths, None)
        batches.append([run.objective.collate([run.data.train[i] for i in mb]) for mb in rows])
    run.train()
    run.finish()

    reference.train()
    optimizer = build_optimizer(recipe.train, reference, None)
    scheduler = build_scheduler(recipe.train, optimizer, STEPS)
    for step, micro in enumerate(batches):
        assert len(micro) == 1  # one micro-batch per step: peft's loss is its mean
        loss = reference(**micro[0]).loss  # AdaLoraModel.forward adds the penalty (labels given)
        loss.backward()
        optimizer.step()
        scheduler.step()
        reference.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return recipe, run, reference


def _adapter(model):
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_training_equals_peft_s_own_flow(runs):
    _, run, reference = runs
    trained = run.accelerator.unwrap_model(run.model)
    config = trained.peft_config["default"]
    assert config.total_step == STEPS  # the run's step count, typed once
    saved = json.loads((run.run.path / "adapter" / "adapter_config.json").read_text())
    assert saved["total_step"] == STEPS
    assert config.rank_pattern is not None  # the final allocation happened
    # (saving drops the adapter name from the keys of the run's config)
    theirs_pattern = {
        k.removesuffix(".default"): v
        for k, v in reference.peft_config["default"].rank_pattern.items()
    }
    assert config.rank_pattern == theirs_pattern
    kept = sum(sum(v) for v in config.rank_pattern.values())
    assert kept < 6 * len(config.rank_pattern)  # ranks were pruned
    ours, theirs = _adapter(trained), _adapter(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    masked = [n for n, p in ours.items() if "lora_E" in n and (p == 0).any()]
    assert masked, "no triplet was masked"


def test_penalty_is_the_one_peft_adds_with_labels(runs):
    recipe, _, reference = runs
    batch = {k: v[:2] for k, v in reference_batch(reference).items()}
    with torch.no_grad():
        with_penalty = reference(**batch).loss  # AdaLoraModel.forward: CE + w * penalty
        plain = reference.base_model.model(**batch).loss  # the wrapped model's own CE
        ours = recipe.adapter.extra_loss(reference)
    assert ours is not None and ours > 0
    torch.testing.assert_close(ours, with_penalty - plain)


def reference_batch(model):
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 2], [1, 21, 31, 41, 51, 61, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_merged_export_round_trips_and_gguf_adapter_is_refused(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, run, _ = runs
    trained = run.accelerator.unwrap_model(run.model)
    batch = reference_batch(trained)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"]).logits
    out = tmp_path / "merged"
    assert main(["export", str(run.run.path), "--out", str(out), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    gguf = tmp_path / "a.gguf"
    code = main(
        ["export", str(run.run.path), "--out", str(gguf), "--format", "gguf", "--adapter-only"]
    )
    assert code != 0 and not gguf.exists()
    assert "adalora adapters have no llama.cpp GGUF form" in capsys.readouterr().err


def test_schedule_must_leave_a_budget_phase_and_resume_is_refused(
    runs, tiny_model, tmp_path, capsys
):
    recipe, run, _ = runs
    from peftkit.methods.base import ApplyContext
    from peftkit.models.load import load_model

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8, seed=1))
    short = write_recipe(
        tmp_path / "short.yaml",
        tiny_model,
        data,
        adapter={**ADALORA, "tinit": 4, "tfinal": 3},
        train=TRAIN,  # 7 steps
    )
    assert main(["train", str(short)]) != 0
    err = capsys.readouterr().err
    assert "tinit (4) + adapter.tfinal (3) leave no budget phase in a run of 7 steps" in err
    assert not (tmp_path / "run").exists()  # refused at setup, nothing left behind
    model = load_model(recipe.model, torch.float32, torch.device("cpu"))
    with pytest.raises(RecipeError, match="adalora cannot --resume"):
        recipe.adapter.apply(
            model, ApplyContext(run.tokenizer, "", False, False, tmp_path, resuming=True)
        )


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_sharded_launch_is_refused_by_name(runs, kind):
    recipe, _, _ = runs
    launch = Launch(kind=kind, processes=2)
    assert any("adalora under" in p for p in launch_problems(launch, recipe))
