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
    ) -> list[np.ndarray]:
        """Row indices of this rank's micro-batches for one optimizer step.

        With `lengths`, the rank's rows are sorted by length first (length grouping), so each
        micro-batch pads little; the set of rows in the step, and so its loss, stay the same.
        """
        start = step_in_epoch * self.global_batch
        rows = order[start : start + self.global_batch][rank :: self.world_size]
        if lengths is not None:
            rows = rows[np.argsort(lengths[rows], kind="stable")]
        return [
            rows[i : i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)
        ]
