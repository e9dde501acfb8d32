"""Resumable checkpoints: trainable weights, optimizer, scheduler, every rank's RNG, data position.

Layout: checkpoints/step-000120/{trainable.safetensors, optimizer.pt, scheduler.pt, rng-<rank>.pt,
state.json}. A checkpoint is written to a hidden temporary folder and renamed into place, with
state.json written last, so only complete checkpoints are ever found. Tensors are loaded back with
`torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.training.run_dir import atomic_write_json


@dataclass
class TrainerState:
    """Where training is: enough, with the files beside it, to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def non_finite_weights(model: nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN or inf (the first few)."""
    bad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all())
    ]
    return bad[:3]


def save_checkpoint(
    checkpoints: Path,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    rng: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint of the state after `state.step` steps; `rng` is the RNG state at that point."""
    target = checkpoints / f"step-{state.step:07d}"
    tmp = checkpoints / f".step-{state.step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(
            trainable_state(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors")
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "state.json", asdict(state))
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
        for old in sorted(complete_checkpoints(checkpoints))[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").exists())


def saved_step(path: Path) -> int:
    """The step a complete checkpoint was written at."""
    return int(json.loads((path / "state.json").read_text())["step"])


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore everything `save_checkpoint` wrote; returns the trainer state."""
    weights = load_file(str(path / "trainable.safetensors"))
    unwrapped = accelerator.unwrap_model(model)
    expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(
            f"checkpoint {path} does not match the model (missing {missing}, unexpected {extra})"
        )
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    # The recipe's lr (and schedule) now, which a resume may change: the saved state holds the old.
    recipe_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    schedule = torch.load(path / "scheduler.pt", weights_only=True)
    lrs = [base * f(schedule["last_epoch"]) for base, f in zip(recipe_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**schedule, "base_lrs": recipe_lrs, "_last_lr": lrs})
    for group, base, lr in zip(optimizer.param_groups, recipe_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainerState(**json.loads((path / "state.json").read_text()))
