"""Which rows make up each optimizer step, and how a micro-batch is padded into tensors.

The rows of optimizer step k are a fixed slice of a seeded per-epoch permutation, whatever the
number of processes or the micro-batch/accumulation split: global batch = micro_batch_size x
grad_accum x processes. So 2 processes x 2 accumulation and 1 process x 4 see the same rows
per step, and a resumed run sees exactly the rows the interrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from peftkit.data.encode import IGNORE, EncodedRow, row_lengths
from peftkit.training.loss import accepts_logits_to_keep

if TYPE_CHECKING:
    from peftkit.methods.base import MethodSpec
    from peftkit.recipe.schema import TrainSpec


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


PACKABLE_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}


def resolve_packing(train: TrainSpec, method: MethodSpec, attn_implementation: str | None) -> bool:
    """train.packing, or when unset: on where transformers' own masking isolates packed rows."""
    if train.packing is not None:
        return train.packing
    return not method.virtual_tokens and attn_implementation in PACKABLE_ATTENTION


def pack_multiple(precision: str, cuda: bool) -> int:
    """Packed lengths are rounded up to this many tokens: 128 under bf16 on CPU (see
    `collate_packed`), else 1 (GPU kernels do not care about shape variety)."""
    return 128 if precision == "bf16" and not cuda else 1


def collate(rows: list[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row; padding gets attention 0 and label IGNORE."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.from_numpy(row.input_ids)
        labels[i, :n] = torch.from_numpy(row.labels)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_packed(
    rows: list[EncodedRow], boundaries: bool = False, pad_to_multiple: int = 1, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Concatenate a micro-batch into one padding-free sequence of shape (1, total_tokens).

    Position ids restart at 0 for every row and no attention mask is passed: transformers then
    builds a block-diagonal causal mask from the position ids (flash-attention uses them as
    varlen boundaries), so no token attends across rows. The first token of each row gets label
    IGNORE, so nothing is predicted across a row boundary either, exactly as with padding, where
    the shift drops each row's first label. With `boundaries`, the cumulative row lengths are
    added as `cu_seq_lens_q` for the varlen SDPA attention (`training/attention.py`).
    With `pad_to_multiple`, a filler segment of pad tokens (its own positions, no labels) rounds
    the length up, so the CPU's bf16 kernels see few distinct shapes (oneDNN builds and caches
    kernels per shape; unbounded shape variety costs memory and first-call time).
    """
    filler = -sum(len(r.input_ids) for r in rows) % pad_to_multiple
    if filler:
        pad = np.full(filler, pad_id, dtype=np.int64)
        rows = [*rows, EncodedRow(pad, np.full(filler, IGNORE, dtype=np.int64), "filler")]
    input_ids = torch.from_numpy(np.concatenate([r.input_ids for r in rows])).long()[None]
    position_ids = torch.from_numpy(
        np.concatenate([np.arange(len(r.input_ids)) for r in rows])
    ).long()[None]
    labels = torch.from_numpy(np.concatenate([r.labels for r in rows])).long()[None]
    labels[position_ids == 0] = IGNORE
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}  # (1, tokens)
    if boundaries:
        lengths = torch.tensor([0] + [len(r.input_ids) for r in rows])
        batch["cu_seq_lens_q"] = lengths.cumsum(0).to(torch.int32)
    return batch


@dataclass
class Batching:
    """How a run's micro-batches are built and scored (chosen once at setup)."""

    packing: bool
    supervised_only: bool
    varlen: bool
    """Packed rows run through peftkit's per-row SDPA (`training/attention.py`)."""
    pack_multiple: int
    lengths: np.ndarray | None
    """Row lengths for length grouping of padded batches (None: no grouping)."""

    def describe(self) -> str:
        return (
            "batching: "
            + ("padding-free packing" if self.packing else "padded")
            + (", grouped by length" if self.lengths is not None else "")
            + ("; logits at supervised positions only" if self.supervised_only else "")
        )


def choose_batching(
    train: TrainSpec,
    method: MethodSpec,
    model: torch.nn.Module,
    has_head: bool,
    precision: str,
    rows: list[EncodedRow],
) -> Batching:
    """Packing, length grouping and supervised-only logits, as far as the method and model allow
    (a task head makes one prediction per row: nothing to pack or pick)."""
    attn = getattr(model.config, "_attn_implementation", None)
    packing = not has_head and resolve_packing(train, method, attn)
    supervised_only = (
        not has_head
        and train.supervised_logits_only
        and not method.virtual_tokens
        and accepts_logits_to_keep(model)
    )
    lengths = None if packing or not train.group_by_length else row_lengths(rows)
    # On CPU under bf16, packed lengths are rounded up to few distinct shapes (see collate_packed).
    multiple = pack_multiple(precision, torch.cuda.is_available())
    return Batching(packing, supervised_only, packing and attn == "sdpa", multiple, lengths)
