"""Multitask mixing: how many rows of each task an epoch draws, and which ones.

An epoch draws N rows, N = all train rows (so `train.epochs` keeps its meaning), split over the
tasks by their share (`data.mixing.strategy`):

    concat:       share_t = n_t / N                  every row once per epoch (`StepPlan`)
    weights:      share_t = w_t / sum_u w_u
    temperature:  share_t = n_t^(1/T) / sum_u n_u^(1/T)   T=1 proportional, T->inf uniform

Task t gets q_t rows per epoch, the largest-remainder rounding of N * share_t (so
|q_t - N share_t| < 1 in every epoch). They are read from an endless stream of seeded
permutations of the task's rows (no row repeats before the task is exhausted; an up-weighted small
task cycles), epoch e taking stream positions [e q_t, (e+1) q_t); the epoch's N rows are then
shuffled together. Everything is a function of (seed, epoch, task), so a resumed run draws exactly
the rows the interrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from peftkit.data.encode import EncodedRow, row_tasks
from peftkit.data.spec import DataSpec
from peftkit.data.step_plan import StepPlan
from peftkit.errors import DataError


def task_shares(spec: DataSpec, counts: dict[str, int]) -> dict[str, float]:
    """Expected share of drawn training rows per task (`counts`: rows per task)."""
    m = spec.mixing
    if m.strategy == "weights":
        weights = {t: 0.0 for t in counts}
        for source in spec.train:
            weights[source.task_name] = source.weight or 0.0  # one weight per task (schema)
        mass = {t: weights[t] for t in counts}
    elif m.strategy == "temperature":
        mass = {t: n ** (1.0 / m.temperature) for t, n in counts.items()}
    else:
        mass = {t: float(n) for t, n in counts.items()}
    total = sum(mass.values())
    return {t: v / total for t, v in mass.items()}


def apportion(total: int, shares: list[float]) -> list[int]:
    """Integers summing to `total`, each within 1 of total * share (largest remainder)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True, eq=False)
class MixedStepPlan(StepPlan):
    """A `StepPlan` whose epochs draw `quotas[t]` rows of each task instead of every row once."""

    task_rows: tuple[np.ndarray, ...] = ()
    """Row indices of each task."""
    quotas: tuple[int, ...] = ()
    """Rows drawn per epoch from each task (they sum to n_rows)."""

    def epoch_order(self, epoch: int) -> np.ndarray:
        drawn = np.concatenate([self._task_draw(t, epoch) for t in range(len(self.task_rows))])
        order = np.random.default_rng([self.seed, epoch]).permutation(drawn)
        return np.resize(order, self.steps_per_epoch * self.global_batch)

    def _task_draw(self, task: int, epoch: int) -> np.ndarray:
        rows, quota = self.task_rows[task], self.quotas[task]
        start, stop = epoch * quota, (epoch + 1) * quota  # positions in the task's stream
        first, last = start // len(rows), -(-stop // len(rows))
        stream = np.concatenate(
            [
                rows[np.random.default_rng([self.seed, 1, task, cycle]).permutation(len(rows))]
                for cycle in range(first, max(last, first + 1))
            ]
        )
        offset = first * len(rows)
        return stream[start - offset : stop - offset]


def step_plan(
    rows: list[EncodedRow],
    spec: DataSpec,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    seed: int,
) -> StepPlan:
    """The run's step plan: plain `StepPlan` for concat, else one that mixes tasks by share."""
    if spec.mixing.strategy == "concat":
        return StepPlan(len(rows), micro_batch_size, grad_accum, world_size, seed)
    tasks = row_tasks(rows)
    task_rows = {t: np.flatnonzero(tasks == t) for t in spec.train_tasks}
    empty = [t for t, idx in task_rows.items() if len(idx) == 0]
    if empty:
        raise DataError(
            f"task {empty[0]!r} has no usable training row (all too long or unsupervised), "
            "so it cannot be mixed in: fix its data or remove its sources"
        )
    shares = task_shares(spec, {t: len(idx) for t, idx in task_rows.items()})
    quotas = apportion(len(rows), list(shares.values()))
    return MixedStepPlan(
        len(rows),
        micro_batch_size,
        grad_accum,
        world_size,
        seed,
        task_rows=tuple(task_rows.values()),
        quotas=tuple(quotas),
    )


def rows_drawn(plan: StepPlan, steps: int) -> np.ndarray:
    """How often each train row was drawn in the first `steps` optimizer steps (all processes)."""
    counts = np.zeros(plan.n_rows, dtype=np.int64)
    for epoch in range(-(-steps // plan.steps_per_epoch)):
        in_epoch = min(plan.steps_per_epoch, steps - epoch * plan.steps_per_epoch)
        counts += np.bincount(
            plan.epoch_order(epoch)[: in_epoch * plan.global_batch], minlength=plan.n_rows
        )
    return counts
