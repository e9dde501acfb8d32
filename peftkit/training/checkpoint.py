"""Resumable checkpoints: trainable weights, optimizer, scheduler, every rank's RNG, data position.

Layout: checkpoints/step-000120/{trainable.safetensors, optimizer.pt, scheduler.pt, rng-<rank>.pt,
state.json}; a sharded (FSDP) run has trainable-<rank>.safetensors and optimizer-<rank>.pt instead,
each process's own shards, resumed by as many processes. Under DeepSpeed the optimizer is ZeRO's:
its partitions (and fp32 master weights) are written by the engine itself into `zero/`
(`engine.save_checkpoint`) beside the gathered trainable.safetensors, and read back by the engine,
which unpickles them (DeepSpeed's loader): resume only run directories you wrote. A checkpoint
is written to a hidden temporary folder and renamed into place, with state.json written last,
so only complete checkpoints are ever found. peftkit's own tensors are loaded back with
`torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import RunDirError, TrainingStopped
from peftkit.io import RunLayout, atomic_write_json, fsync_dir, sync_tree
from peftkit.training import sharded as shards


@dataclass
class TrainerState:
    """Where training is: enough, with the files beside it, to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    best_value: float | None = None
    """Best value so far of the watched metric (train.early_stopping.metric; eval_loss)."""
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    largest_micro_batch_tokens: int = 0
    """Tokens (padding included) of the largest micro-batch so far: what sizes the activations."""


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


class DamagedCheckpoint(Exception):
    """A checkpoint folder whose files cannot be read back (truncated, garbage, non-finite)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = path, reason


@dataclass
class SavedCheckpoint:
    """Everything a checkpoint holds, read and checked, not yet applied to the model."""

    path: Path
    state: TrainerState
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None
    shards: int = 0
    """Processes whose shards the checkpoint holds (0: not sharded, whole tensors)."""
    zero: bool = False
    """The optimizer state is DeepSpeed ZeRO's (in `zero/`, loaded by the engine)."""


ZERO_TAG = "zero"
"""The folder (DeepSpeed's checkpoint tag) that holds a DeepSpeed engine's checkpoint."""


def is_deepspeed(model: nn.Module) -> bool:
    """A DeepSpeed engine (what `accelerator.prepare` returns under DeepSpeed)."""
    return hasattr(model, "save_checkpoint") and hasattr(model, "zero_optimization_stage")


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
    """Write a checkpoint of the state after `state.step` steps; `rng` is the RNG state at that point.

    Written into a hidden folder and renamed into place; a write that fails (a full disk) removes
    the hidden folder and raises `TrainingStopped`, leaving the earlier checkpoints as they were.
    """
    target = checkpoints / f"step-{state.step:07d}"
    tmp = checkpoints / f".step-{state.step:07d}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rank = accelerator.process_index
        torch.save(rng, tmp / f"rng-{rank}.pt")
        unwrapped = accelerator.unwrap_model(model)
        if is_deepspeed(model):  # ZeRO's partitions, each process its own (a collective)
            model.save_checkpoint(
                str(tmp), tag=ZERO_TAG, save_latest=False, exclude_frozen_parameters=True
            )
            with shards.gathered_trainable(unwrapped, keep=accelerator.is_main_process):
                if accelerator.is_main_process:
                    save_file(trainable_state(unwrapped), str(tmp / "trainable.safetensors"))
        elif shards.is_sharded(unwrapped):  # every process writes its own shards
            save_file(
                shards.local_trainable_state(unwrapped), str(tmp / f"trainable-{rank}.safetensors")
            )
            torch.save(shards.local_optimizer_state(optimizer), tmp / f"optimizer-{rank}.pt")
        elif accelerator.is_main_process:
            save_file(trainable_state(unwrapped), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / "state.json", asdict(state))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingStopped(
            f"could not write the checkpoint of step {state.step} to {checkpoints}: "
            f"{str(e).splitlines()[0]}; nothing half-written was left. Free space, then continue "
            "with --resume"
        ) from e
    if accelerator.is_main_process:
        sync_tree(tmp)  # durable before it is renamed into place
        _replace(tmp, target)
        fsync_dir(checkpoints)
        for old in complete_checkpoints(checkpoints)[:-keep_last]:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return target


def _replace(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first, then removed."""
    if target.exists():
        remove_checkpoint(target)
    new.replace(target)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint atomically: renamed out of sight in one step, then removed."""
    doomed = path.with_name(f".{path.name}.pruning")
    shutil.rmtree(doomed, ignore_errors=True)
    path.replace(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(checkpoints: Path) -> None:
    """Remove what an interrupted save or prune left behind (hidden .tmp / .pruning folders)."""
    for leftover in [*checkpoints.glob(".step-*.tmp"), *checkpoints.glob(".step-*.pruning")]:
        shutil.rmtree(leftover, ignore_errors=True)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoint folders whose last file (state.json) was written, oldest first."""
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").exists())


def read_checkpoint(path: Path, process_index: int = 0) -> SavedCheckpoint:
    """Read and check every file of a checkpoint; raises `DamagedCheckpoint` saying which is bad."""

    def read(name: str, load: Any) -> Any:
        try:
            return load(path / name)
        except FileNotFoundError:
            raise DamagedCheckpoint(path, f"{name} is missing") from None
        except Exception as e:  # truncated or garbage: each library raises its own kind
            raise DamagedCheckpoint(path, f"{name} cannot be read ({type(e).__name__})") from e

    def tensors(file: Path) -> Any:
        # On the CPU, not where they were saved from (rank 0's GPU for every rank): loading
        # into the optimizer moves each state tensor to its parameter's device.
        return torch.load(file, map_location="cpu", weights_only=True)

    raw = read("state.json", lambda f: json.loads(f.read_text()))
    try:
        state = TrainerState(**raw)
        int(state.step)
    except (TypeError, ValueError):
        raise DamagedCheckpoint(path, "state.json does not hold a trainer state") from None
    n_shards = len(list(path.glob("trainable-*.safetensors")))
    suffix = f"-{process_index}" if n_shards else ""
    weights_file = f"trainable{suffix}.safetensors"
    weights = read(weights_file, lambda f: load_file(str(f)))
    bad = [n for n, t in weights.items() if not bool(torch.isfinite(t).all())][:3]
    if bad:
        raise DamagedCheckpoint(path, f"{weights_file} holds NaN or inf ({', '.join(bad)})")
    zero = (path / ZERO_TAG).is_dir()
    optimizer = {} if zero else read(f"optimizer{suffix}.pt", tensors)
    scheduler = read("scheduler.pt", tensors)
    rng_file = f"rng-{process_index}.pt"
    rng = read(rng_file, tensors) if (path / rng_file).exists() else None
    return SavedCheckpoint(path, state, weights, optimizer, scheduler, rng, n_shards, zero)


def newest_intact(
    checkpoints: Path, accelerator: Accelerator | None = None
) -> tuple[SavedCheckpoint | None, list[DamagedCheckpoint]]:
    """The newest checkpoint that reads back whole, and the damaged ones newer than it.

    With `accelerator` (a collective: every process must call it), each process reads the
    checkpoint with its own RNG file and the processes agree: a checkpoint that any process cannot
    read is damaged for all, so every process resumes from the same step. Without, this process
    alone judges (enough to name a checkpoint in a message).
    """
    damaged = []
    for path in reversed(complete_checkpoints(checkpoints)):
        saved, problem = None, None
        try:
            saved = read_checkpoint(path, accelerator.process_index if accelerator else 0)
        except DamagedCheckpoint as e:
            problem = e.reason
        # one entry per process, the same list on every process
        problems = gather_object([problem]) if accelerator else [problem]
        if not any(problems):
            return saved, damaged
        many = len(problems) > 1
        reasons = [f"process {i}: {p}" if many else p for i, p in enumerate(problems) if p]
        damaged.append(DamagedCheckpoint(path, "; ".join(reasons)))
    return None, damaged


def set_aside(path: Path, main: bool) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never resumed from)."""
    aside = path.with_name(f"damaged-{path.name}")
    if main:
        shutil.rmtree(aside, ignore_errors=True)
        path.replace(aside)
    return aside


def apply_checkpoint(
    saved: SavedCheckpoint,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> TrainerState:
    """Restore what `read_checkpoint` read into the model, optimizer, scheduler and RNG."""
    unwrapped = accelerator.unwrap_model(model)
    expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(saved.weights) != expected:
        missing = sorted(expected - set(saved.weights))[:3]
        extra = sorted(set(saved.weights) - expected)[:3]
        raise RunDirError(
            f"checkpoint {saved.path} does not match the model (missing {missing}, unexpected {extra})"
        )
    if saved.zero != is_deepspeed(model):
        raise RunDirError(
            f"checkpoint {saved.path} was written "
            + ("under DeepSpeed" if saved.zero else "without DeepSpeed")
            + " and this run is "
            + ("not under DeepSpeed" if saved.zero else "under DeepSpeed")
            + ": resume with the launch that wrote it"
        )
    sharded = shards.is_sharded(unwrapped)
    if (saved.shards or (1 if sharded else 0)) != (accelerator.num_processes if sharded else 0):
        raise RunDirError(
            f"checkpoint {saved.path} holds "
            + (f"the shards of {saved.shards} processes" if saved.shards else "unsharded weights")
            + f" but this run is {'sharded over ' if sharded else 'not sharded, '}"
            f"{accelerator.num_processes} process(es): resume with the launch that wrote it"
        )
    params = dict(unwrapped.named_parameters())
    # The recipe's lr (and schedule) now, which a resume may change: the saved state holds the old.
    recipe_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    if saved.zero:  # the engine restores the trainable weights, ZeRO's master copy and state
        model.load_checkpoint(
            str(saved.path),
            tag=ZERO_TAG,
            load_module_strict=False,  # only the trainable weights were saved
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # peftkit's scheduler is restored below
        )
    else:
        with torch.no_grad():
            for name, value in saved.weights.items():
                target = shards.local(params[name])
                target.copy_(value.to(target.device))
        if sharded:
            shards.load_local_optimizer_state(optimizer, saved.optimizer)
        else:
            optimizer.load_state_dict(saved.optimizer)
    schedule = saved.scheduler
    lrs = [base * f(schedule["last_epoch"]) for base, f in zip(recipe_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**schedule, "base_lrs": recipe_lrs, "_last_lr": lrs})
    for group, base, lr in zip(optimizer.param_groups, recipe_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    if saved.rng is not None:
        set_rng_state(saved.rng)
    return saved.state


def resume_latest(
    run: RunLayout,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    set_step: Callable[[int], Any],
    say: Callable[[str], None],
) -> tuple[TrainerState, Path]:
    """`--resume`: the state of the newest intact checkpoint, applied to the model, optimizer and
    scheduler (`set_step(step)` first: its weights are those trainable at its step), and its path.
    A damaged checkpoint is set aside (and said); none intact is a `RunDirError`."""
    main = accelerator.is_main_process
    if main:
        clean_leftovers(run.checkpoints)
    saved, damaged = newest_intact(run.checkpoints, accelerator)
    for bad in damaged:
        say(f"warning: {bad}; set aside as {set_aside(bad.path, main)}")
    if saved is None:
        raise RunDirError(
            f"--resume: {run.path} has no intact checkpoint to resume from "
            + (
                "(" + "; ".join(str(bad) for bad in damaged) + ")"
                if damaged
                else "(checkpoints are written every train.save_every steps)"
            )
        )
    set_step(saved.state.step)
    state = apply_checkpoint(saved, accelerator, model, optimizer, scheduler)
    say(f"resuming from {saved.path} (step {state.step})")
    return state, saved.path
