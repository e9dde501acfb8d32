"""Which rows make up each optimizer step.

The rows of optimizer step k are a fixed slice of a seeded per-epoch permutation, whatever the
number of processes or the micro-batch/accumulation split: global batch = micro_batch_size x
grad_accum x processes. So 2 processes x 2 accumulation and 1 process x 4 see the same rows
per step, and a resumed run sees exactly the rows the interrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenBudget:
    """Packed micro-batches cut by tokens instead of rows (`train.micro_batch_tokens`)."""

    lengths: np.ndarray
    """Token count of every training row."""
    max_tokens: int


@dataclass(frozen=True)
class StepPlan:
    n_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.global_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation, wrapped around so that the last step is a full global batch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        padded = self.steps_per_epoch * self.global_batch
        return np.resize(order, padded)  # np.resize repeats from the start

    def micro_batches(
        self,
        order: np.ndarray,
        step_in_epoch: int,
        rank: int,
        lengths: np.ndarray | None = None,
        budget: TokenBudget | None = None,
    ) -> list[np.ndarray]:
        """Row indices of this rank's micro-batches for one optimizer step.

        With `lengths`, the rank's rows are sorted by length first (length grouping), so each
        micro-batch pads little; the set of rows in the step, and so its loss, stay the same.
        With a token `budget`, the rank's rows are split into as few packed micro-batches as keep
        each within `budget.max_tokens` (a longer row goes alone), and every rank gets the same
        number of micro-batches (sharded runs gather weights once per micro-batch on every rank).
        """
        start = step_in_epoch * self.global_batch
        step_rows = order[start : start + self.global_batch]
        rows = step_rows[rank :: self.world_size]
        if budget is not None:
            ranks = [step_rows[r :: self.world_size] for r in range(self.world_size)]
            k = max(_bins_needed(budget.lengths[r], budget.max_tokens) for r in ranks)
            return [rows[b] for b in _token_bins(budget.lengths[rows], budget.max_tokens, k)]
        if lengths is not None:
            rows = rows[np.argsort(lengths[rows], kind="stable")]
        return [
            rows[i : i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)
        ]


def _balanced_bins(lengths: np.ndarray, k: int) -> list[np.ndarray]:
    """Positions of `lengths` in k bins: longest first, each to the lightest bin (ties: the
    lowest bin). Deterministic, and no bin is empty (k <= rows)."""
    loads = np.zeros(k, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(k)]
    for i in np.argsort(-lengths, kind="stable"):
        b = int(np.argmin(loads))
        loads[b] += lengths[i]
        members[b].append(int(i))
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def _fewest_bins(lengths: np.ndarray, max_tokens: int) -> int:
    """The fewest balanced bins of rows no longer than max_tokens that each hold at most it."""
    k = max(1, -(-int(lengths.sum()) // max_tokens))
    while k < len(lengths) and any(
        lengths[b].sum() > max_tokens for b in _balanced_bins(lengths, k)
    ):
        k += 1
    return k


def _bins_needed(lengths: np.ndarray, max_tokens: int) -> int:
    """Micro-batches for one rank's rows: one per row longer than the budget, plus the fewest
    balanced bins that keep the others within it."""
    long = lengths > max_tokens
    rest = lengths[~long]
    return int(long.sum()) + (_fewest_bins(rest, max_tokens) if len(rest) else 0)


def _token_bins(lengths: np.ndarray, max_tokens: int, k: int) -> list[np.ndarray]:
    """Positions of `lengths` in exactly k micro-batches (k >= _bins_needed, k <= rows): each row
    longer than the budget alone, the others balanced over the remaining bins; in plan order."""
    long = np.flatnonzero(lengths > max_tokens)
    rest = np.flatnonzero(lengths <= max_tokens)
    bins = [np.array([i]) for i in long]
    if len(rest):
        bins += [rest[b] for b in _balanced_bins(lengths[rest], k - len(long))]
    return sorted(bins, key=lambda b: int(b[0]))
