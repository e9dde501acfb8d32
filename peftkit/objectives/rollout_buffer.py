"""Rollout reuse: one generation of GRPO rollouts serving several optimizer steps, as TRL's
`num_iterations` and `steps_per_generation` define it (`GRPOTrainer._prepare_inputs`).

With grad_accum = a micro-batches per optimizer step, steps_per_generation = S (a multiple of a,
TRL's default S = a) and num_iterations = I, a generation rolls out S micro-batches of fresh
prompts, k = S / a optimizer steps' worth, and serves a cycle of k x I optimizer steps: step p of
the cycle trains on slice p % k of it (its a micro-batches), so each slice is optimised I times.
Prompts are drawn once per generation: `ReusePlan` maps the loop's optimizer steps onto the data
plan's steps (an epoch has ceil(steps / k) x k x I optimizer steps), handing the generation step
the rows of all k slices and every other step the rows of the slice it trains on.

When a cycle is longer than one step the policy moves between generation and use, so the
rollouts' log-probs are kept from generation time (`old_logps`) and the loss's ratio to them is
clipped. A resumed run must train on the very rollouts the interrupted one generated, with weights
that have since moved on, so each generation is written to the run's state folder
(`state/rollouts/step-<generation step>-<process>.safetensors`) and read back by a run resumed
inside its cycle; files no checkpoint can need any more are removed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peftkit.data.step_plan import StepPlan, TokenBudget
from peftkit.errors import RunDirError
from peftkit.io import atomic_write_with


@dataclass(frozen=True)
class Reuse:
    """How one generation of rollouts is used: k slices, each optimised `iterations` times."""

    slices: int  # k = steps_per_generation / grad_accum
    iterations: int  # I = num_iterations

    @classmethod
    def of(cls, steps_per_generation: int | None, num_iterations: int, grad_accum: int) -> Reuse:
        return cls((steps_per_generation or grad_accum) // grad_accum, num_iterations)

    @property
    def cycle(self) -> int:
        """Optimizer steps one generation serves."""
        return self.slices * self.iterations

    def generates(self, step: int) -> bool:
        """Optimizer step `step` (0-based) rolls out a new generation."""
        return step % self.cycle == 0

    def slice_of(self, step: int) -> int:
        return step % self.cycle % self.slices

    def generation_step(self, step: int) -> int:
        return step - step % self.cycle


class ReusePlan:
    """A `StepPlan` seen through rollout reuse: optimizer step -> the data plan's step(s)."""

    def __init__(self, base: StepPlan, reuse: Reuse) -> None:
        self.base, self.reuse = base, reuse
        self.generations_per_epoch = math.ceil(base.steps_per_epoch / reuse.slices)

    def __getattr__(self, name: str) -> Any:  # n_rows, micro_batch_size, global_batch, ...
        return getattr(self.base, name)

    @property
    def steps_per_epoch(self) -> int:
        return self.generations_per_epoch * self.reuse.cycle

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The data plan's order, wrapped on to fill the epoch's last generation."""
        rows = self.generations_per_epoch * self.reuse.slices * self.base.global_batch
        return np.resize(self.base.epoch_order(epoch), rows)

    def micro_batches(
        self,
        order: np.ndarray,
        step_in_epoch: int,
        rank: int,
        lengths: np.ndarray | None = None,
        budget: TokenBudget | None = None,
    ) -> list[np.ndarray]:
        """A generation step: the micro-batches of all k slices of its generation, in order;
        any other step: those of the slice it trains on."""
        cycle, at = divmod(step_in_epoch, self.reuse.cycle)
        first = cycle * self.reuse.slices
        wanted = range(self.reuse.slices) if at == 0 else [at % self.reuse.slices]
        return [
            mb
            for j in wanted
            for mb in self.base.micro_batches(order, first + j, rank, lengths, budget)
        ]


# ------------------------------------------------------------------ the buffer on disk


def buffer_file(folder: Path, generation_step: int, rank: int) -> Path:
    return folder / f"step-{generation_step:07d}-{rank}.safetensors"


def save_buffer(
    folder: Path,
    generation_step: int,
    rank: int,
    slices: list[list[dict[str, torch.Tensor]]],
    stats: list[dict[str, torch.Tensor]],
) -> None:
    """Write one generation (its slices of rolled-out micro-batches and their step statistics)."""
    flat = {}
    for i, batches in enumerate(slices):
        for j, batch in enumerate(batches):
            flat.update({f"{i}.{j}.{k}": v.detach().cpu().contiguous() for k, v in batch.items()})
        flat.update({f"{i}.stats.{k}": v.cpu().contiguous() for k, v in stats[i].items()})
    folder.mkdir(parents=True, exist_ok=True)
    path = buffer_file(folder, generation_step, rank)
    atomic_write_with(path, lambda tmp: save_file(flat, str(tmp)))


def load_buffer(
    folder: Path, generation_step: int, rank: int, step: int
) -> tuple[list[list[dict[str, torch.Tensor]]], list[dict[str, torch.Tensor]]]:
    """The generation `save_buffer` wrote; a missing file is a named `RunDirError`."""
    path = buffer_file(folder, generation_step, rank)
    if not path.exists():
        raise RunDirError(
            f"step {step} trains on the rollouts generated at step {generation_step}, and "
            f"{path} that holds them is missing: resume from a checkpoint at a generation step "
            "(a multiple of objective.num_iterations x steps_per_generation / train.grad_accum)"
        )
    slices: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    stats: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        i, j, name = key.split(".", 2)
        if j == "stats":
            stats.setdefault(int(i), {})[name] = value
        else:
            slices.setdefault(int(i), {}).setdefault(int(j), {})[name] = value
    ordered = [[slices[i][j] for j in sorted(slices[i])] for i in sorted(slices)]
    return ordered, [stats[i] for i in sorted(stats)]


def prune_buffers(folder: Path, checkpoints: list[Path], reuse: Reuse, keep_from: int) -> None:
    """Remove generations that neither a kept checkpoint nor step `keep_from` lies inside."""
    steps = [int(p.name.rsplit("-", 1)[-1]) for p in checkpoints]
    oldest = reuse.generation_step(min([*steps, keep_from]))
    for path in folder.glob("step-*.safetensors"):
        found = re.fullmatch(r"step-(\d+)-\d+\.safetensors", path.name)
        if found and int(found.group(1)) < oldest:
            path.unlink(missing_ok=True)
