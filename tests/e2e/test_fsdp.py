"""FSDP2 through `accelerate launch --config_file recipes/accelerate/fsdp2.yaml`, on CPU (gloo):
two sharded processes train exactly as one process does, their sharded checkpoint resumes
exactly, the adapter holds whole (gathered) trainable weights, and the run exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import api
from peftkit.cli import main
from peftkit.errors import RecipeError
from peftkit.launch import Launch
from peftkit.recipe.launch_rules import check_launch, launch_problems
from tests.conftest import chat_rows, train_in_two_processes, write_jsonl, write_recipe

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"micro_batch_size": 2, "lr": 1e-2, "save_every": 2}


def _launch(recipe: Path, *args: str) -> None:
    config = str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml")
    launcher = ["-m", "accelerate.commands.launch", "--config_file", config]
    train_in_two_processes(recipe, *args, launcher=[*launcher, "--main_process_port={port}"])


def _losses(run: Path) -> dict[int, float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow(reason="three runs, two of them 2-process launches (about a minute on 2 cores)")
def test_fsdp_two_processes_match_one_and_resume_exactly(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16, seed=7))
    single = write_recipe(
        tmp_path / "single.yaml",
        tiny_model,
        data,
        train={**TRAIN, "max_steps": 3, "grad_accum": 2},
        output={"dir": str(tmp_path / "single"), "plot": False},
    )
    assert main(["train", str(single)]) == 0
    sharded = write_recipe(
        tmp_path / "fsdp.yaml",
        tiny_model,
        data,
        train={**TRAIN, "max_steps": 3, "grad_accum": 1},  # x 2 processes: the same 4 rows a step
        output={"dir": str(tmp_path / "fsdp"), "plot": False},
    )
    _launch(sharded, "train.max_steps=2")  # stops at step 2 with a checkpoint ...
    _launch(sharded, "--resume")  # ... and a second launch continues to step 3
    run = tmp_path / "fsdp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_rows"] == 4
    assert summary["engine"] == "FSDP2" and summary["precision"] == "fp32"
    # The checkpoint holds each process's shards: half of every LoRA matrix's rows each.
    ckpt = run / "checkpoints" / "step-0000002"
    shard = load_file(str(ckpt / "trainable-0.safetensors"))
    whole = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    name = next(n for n in shard if "lora_B" in n)
    assert shard[name].shape[0] * 2 == next(v for k, v in whole.items() if "lora_B" in k).shape[0]
    assert (ckpt / "optimizer-1.pt").is_file() and not (ckpt / "optimizer.pt").exists()
    # The adapter is whole (gathered) and equals the 1-process run's; so does every step's loss.
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(adapter[k], whole[k], atol=1e-5, rtol=1e-5, msg=k)
    a, b = _losses(tmp_path / "single"), _losses(run)
    assert sorted(b) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-5 for s in a)
    # The sharded run exports like any other (merge, reload with transformers, fidelity gate).
    report = api.export(run, tmp_path / "export")
    assert report["passed"] and (tmp_path / "export" / "model.safetensors").is_file()


def test_sharded_launches_refuse_what_cannot_work_before_loading(tmp_path, monkeypatch):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "no-such-model",  # never loaded: the refusal comes first
        tmp_path / "no-such-data.jsonl",
        adapter={"method": "full"},
        train={"grad_accum": 2, "save_every": 2},
        output={"dir": str(tmp_path / "run"), "sample_prompts": ["hi"], "plot": False},
    )
    r = api.validate(recipe)
    fsdp = launch_problems(Launch("fsdp", 2), r)
    assert any("sample_prompts" in p for p in fsdp) and any("method full" in p for p in fsdp)
    deepspeed = " ".join(launch_problems(Launch("deepspeed", 2, zero_stage=3), r))
    assert "sample_prompts" in deepspeed and "method full" in deepspeed
    for key in ("train.grad_accum", "train.save_every", "train.max_grad_norm"):  # all run now
        assert key not in deepspeed
    assert check_launch(r, Launch("ddp", 2)).kind == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RecipeError, match="cannot run under fsdp"):
        api.train(r)
    assert not (tmp_path / "run").exists()
