"""The training loop's guarantees: accumulation equals one big batch, resume continues exactly,
two processes match one, and an interruption saves a checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from peftkit import api
from peftkit.cli import main
from peftkit.errors import TrainingStopped
from tests.conftest import (
    RESUME_TRAIN,
    chat_rows,
    train_in_two_processes,
    write_jsonl,
    write_recipe,
)

LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> dict[int, float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_same_adapter(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float
) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


PLAIN_BATCHING = {"packing": False, "group_by_length": False, "supervised_logits_only": False}


def test_accumulation_and_batching_modes_match_one_big_padded_batch(tmp_path, tiny_model):
    """micro-batch 1 x accumulation 4 equals 4 x 1, and packing / length grouping / supervised-only
    logits leave every step's loss and the adapter as the plain padded computation has them."""
    rows = chat_rows(16, seed=5)  # 1-2 turns of 1-6 words: very different lengths
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    runs = {}
    for name, mbs, accum, batching in [
        ("big-plain", 4, 1, PLAIN_BATCHING),
        ("accum-plain", 1, 4, PLAIN_BATCHING),
        ("big-packed", 4, 1, {}),  # the defaults: packing + supervised-only logits
        ("accum-packed", 1, 4, {}),
        ("grouped", 2, 2, {"packing": False}),
        ("token-budget", 4, 1, {"micro_batch_tokens": 40}),  # 4 rows cut into several passes
    ]:
        recipe = write_recipe(
            tmp_path / f"{name}.yaml",
            tiny_model,
            data,
            adapter=LORA,
            train={
                "max_steps": 3,
                "micro_batch_size": mbs,
                "grad_accum": accum,
                "lr": 1e-2,
                "warmup_steps": 0,
                "max_grad_norm": None,
                **batching,
            },
            output={"dir": str(tmp_path / name), "plot": False},
        )
        assert main(["train", str(recipe)]) == 0
        runs[name] = tmp_path / name
    lengths = {len(r["messages"]) for r in rows}
    assert len(lengths) > 1
    summary = lambda name: json.loads((runs[name] / "summary.json").read_text())  # noqa: E731
    budgeted = summary("token-budget")["largest_micro_batch_tokens"]
    assert budgeted < summary("big-packed")["largest_micro_batch_tokens"]
    reference = _losses(runs["big-plain"])
    for name, run in runs.items():
        _assert_same_adapter(_adapter(runs["big-plain"]), _adapter(run), tol=1e-5)
        losses = _losses(run)
        assert losses.keys() == reference.keys(), name
        assert all(abs(reference[s] - losses[s]) < 1e-5 for s in reference), name


def test_fused_lora_mlp_trains_the_same_adapter_as_module_by_module(
    tmp_path, tiny_model, monkeypatch, lora_swiglu_calls
):
    """The fused SwiGLU MLP (kernels/lora_mlp.py) runs in a LoRA run and changes nothing it
    trains: same loss at every step and the same adapter as the model's own MLP forward."""
    from peftkit.kernels import apply as kernels

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16, seed=5))
    calls = lora_swiglu_calls
    runs = {}
    for name in ("fused", "own"):
        if name == "own":
            monkeypatch.setattr(kernels, "install_fused_lora_mlps", lambda model: 0)
        recipe = write_recipe(
            tmp_path / f"{name}.yaml",
            tiny_model,
            data,
            adapter=LORA,
            train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
            output={"dir": str(tmp_path / name), "plot": False},
        )
        before = calls[0]
        assert main(["train", str(recipe)]) == 0
        runs[name] = calls[0] - before
        if name == "fused":
            assert runs[name] >= 3 * 2  # every step ran it in every layer (plus evaluations)
    assert runs["own"] == 0
    _assert_same_adapter(_adapter(tmp_path / "fused"), _adapter(tmp_path / "own"), tol=1e-5)
    fused, own = _losses(tmp_path / "fused"), _losses(tmp_path / "own")
    assert fused.keys() == own.keys() and all(abs(fused[s] - own[s]) < 1e-5 for s in own)


def _resumable_recipe(tmp_path: Path, tiny_model: Path, data: Path, out: str, **train) -> Path:
    return write_recipe(
        tmp_path / f"{out}.yaml",
        tiny_model,
        data,
        adapter={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1},  # dropout: RNG matters
        train={
            **RESUME_TRAIN,
            **train,
        },
        output={"dir": str(tmp_path / out), "plot": False},
    )


def test_resume_after_a_crash_gives_the_same_loss_at_every_later_step(tmp_path, tiny_model):
    data = write_jsonl(
        tmp_path / "d.jsonl", chat_rows(10, seed=1)
    )  # 10 rows, 4 per step: crosses epochs
    full = _resumable_recipe(tmp_path, tiny_model, data, "full")
    assert main(["train", str(full)]) == 0
    reference = _losses(tmp_path / "full")
    assert len(reference) == 8

    # Simulate a crash right after the checkpoint of step 4: later checkpoints and results vanish,
    # metrics.jsonl still holds lines for steps 5-6 written before the crash.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for name in ("step-0000006", "step-0000008"):
        shutil.rmtree(crashed / "checkpoints" / name)
    for name in ("adapter", "best", "summary.json"):
        shutil.rmtree(crashed / name, ignore_errors=True) if name != "summary.json" else (
            crashed / name
        ).unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")

    resumed = _resumable_recipe(tmp_path, tiny_model, data, "crashed")
    assert main(["train", str(resumed), "--resume"]) == 0
    again = _losses(crashed)
    assert again.keys() == reference.keys()
    assert all(again[s] == reference[s] for s in range(5, 9)), (again, reference)
    _assert_same_adapter(_adapter(tmp_path / "full"), _adapter(crashed), tol=0)


def test_interrupt_saves_a_checkpoint_that_resumes_exactly(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    reference_recipe = _resumable_recipe(tmp_path, tiny_model, data, "ref", save_every=None)
    api.train(reference_recipe)
    reference = _losses(tmp_path / "ref")

    def interrupt_after_three(step, record):
        if step == 3:
            raise KeyboardInterrupt

    recipe = _resumable_recipe(tmp_path, tiny_model, data, "int", save_every=None)
    with pytest.raises(TrainingStopped, match="interrupted at step 3"):
        api.train(recipe, on_step=interrupt_after_three)
    assert (tmp_path / "int" / "checkpoints" / "step-0000003" / "state.json").exists()
    api.train(recipe, resume=True)
    assert _losses(tmp_path / "int") == reference


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_optimizer_step_is_acted_on_at_the_step_boundary(
    tmp_path, tiny_model, signum
):
    """The signal lands inside step 3's optimizer.step(): step 3 completes and is checkpointed as
    step 3, and the resumed run equals an uninterrupted one bit for bit."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    api.train(_resumable_recipe(tmp_path, tiny_model, data, "ref"))
    steps = []

    def signal_mid_step(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signum)  # the handler runs here, inside optimizer.step()

    recipe = _resumable_recipe(tmp_path, tiny_model, data, "sig")
    hook = register_optimizer_step_post_hook(signal_mid_step)
    try:
        with pytest.raises(TrainingStopped, match=r"interrupted \(SIG\w+\) at step 3"):
            api.train(recipe)
    finally:
        hook.remove()
    assert sorted(p.name for p in (tmp_path / "sig" / "checkpoints").glob("step-*")) == [
        "step-0000002",
        "step-0000003",
    ]
    api.train(recipe, resume=True)
    assert _losses(tmp_path / "sig") == _losses(tmp_path / "ref")
    _assert_same_adapter(_adapter(tmp_path / "ref"), _adapter(tmp_path / "sig"), tol=0)


def test_resume_refuses_a_changed_recipe_and_a_missing_run(tmp_path, tiny_model, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    recipe = _resumable_recipe(tmp_path, tiny_model, data, "run1", max_steps=2)
    assert main(["train", str(recipe), "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(["train", str(recipe)]) == 0
    assert (tmp_path / "run1" / "checkpoints" / "step-0000002").is_dir()
    assert main(["train", str(recipe), "train.weight_decay=0.5", "--resume"]) == 2
    assert "train.weight_decay" in capsys.readouterr().err
    # Changing only the length of the run is allowed: it extends the run.
    assert main(["train", str(recipe), "train.max_steps=4", "--resume"]) == 0
    assert sorted(_losses(tmp_path / "run1")) == [1, 2, 3, 4]
    assert "resuming from" in capsys.readouterr().out


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16, seed=7))
    single = write_recipe(
        tmp_path / "single.yaml",
        tiny_model,
        data,
        adapter=LORA,
        train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2},
        output={"dir": str(tmp_path / "single"), "plot": False},
    )
    assert main(["train", str(single)]) == 0
    double = write_recipe(
        tmp_path / "double.yaml",
        tiny_model,
        data,
        adapter=LORA,
        train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2},
        output={"dir": str(tmp_path / "double"), "plot": False},
    )
    train_in_two_processes(double)
    summary = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_rows"] == 4
    _assert_same_adapter(_adapter(tmp_path / "single"), _adapter(tmp_path / "double"), tol=1e-5)
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "double")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)


def test_bf16_with_lora_dropout_runs_the_fused_paths(tmp_path, tiny_model, caplog):
    """The GPU defaults, on CPU: bf16 autocast over a bf16 base, fp32 LoRA weights, LoRA dropout
    0.05, packed rows. summary.json and the printed summary say that the fused MLP, the fused
    head and the varlen attention ran (and the fused MLP did, every training call)."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8, seed=2))
    recipe = write_recipe(
        tmp_path / "bf16.yaml",
        tiny_model,
        data,
        adapter={**LORA, "dropout": 0.05},
        train={"max_steps": 2, "micro_batch_size": 4, "precision": "bf16", "warmup_steps": 0},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    with caplog.at_level("INFO", logger="peftkit"):
        assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    speedups = summary["speedups"]
    assert speedups["fused_mlp"] == {"used": True}
    assert speedups["fused_head"] == {"used": True}
    assert speedups["varlen_attention"]["used"] is True
    assert summary["attention"] == "sdpa per packed row"  # no flash-attn on CPU
    assert "fused mlp on; fused head on; varlen attention on" in caplog.text
