"""How a micro-batch is padded (or packed) into tensors, and how a run batches (chosen once).

Which rows make up each optimizer step is `peftkit.data.step_plan.StepPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from peftkit import _compat
from peftkit.data.encode import IGNORE, EncodedRow, row_lengths
from peftkit.data.step_plan import TokenBudget
from peftkit.errors import RecipeError
from peftkit.objectives.loss import accepts_logits_to_keep

if TYPE_CHECKING:
    from peftkit.methods.base import MethodSpec


class TrainSpec(Protocol):
    """What batching reads of the recipe's `train:` section (`peftkit.recipe.schema.TrainSpec`)."""

    packing: bool | None
    supervised_logits_only: bool
    group_by_length: bool
    micro_batch_tokens: int | None


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
) -> dict[str, Any]:
    """Concatenate a micro-batch into one padding-free sequence of shape (1, total_tokens).

    Position ids restart at 0 for every row and no attention mask is passed: transformers then
    builds a block-diagonal causal mask from the position ids (flash-attention uses them as
    varlen boundaries), so no token attends across rows. The first token of each row gets label
    IGNORE, so nothing is predicted across a row boundary either, exactly as with padding, where
    the shift drops each row's first label. With `boundaries`, the row boundaries for the varlen
    attention (`kernels/attention.py`), computed here on the host once per micro-batch:
    `cu_seq_lens_q/k` (cumulative lengths, int32), `max_length_q/k` and `row_lengths` (ints).
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
        lengths = tuple(len(r.input_ids) for r in rows)
        cu = torch.tensor((0, *lengths)).cumsum(0).to(torch.int32)
        batch |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "row_lengths": lengths}
        batch |= {"max_length_q": max(lengths), "max_length_k": max(lengths)}
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device`; host values (the packed row lengths) stay."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Batching:
    """How a run's micro-batches are built and scored (chosen once at setup)."""

    packing: bool
    supervised_only: bool
    varlen: bool
    """Packed rows run through peftkit's varlen attention (`kernels/attention.py`)."""
    pack_multiple: int
    lengths: np.ndarray | None
    """Row lengths for length grouping of padded batches (None: no grouping)."""
    budget: TokenBudget | None = None
    """Packed micro-batches cut by tokens (`train.micro_batch_tokens`), else every N rows."""

    def describe(self) -> str:
        return (
            "batching: "
            + ("padding-free packing" if self.packing else "padded")
            + (", grouped by length" if self.lengths is not None else "")
            + (
                f", at most {self.budget.max_tokens:,} tokens per micro-batch"
                if self.budget is not None
                else ""
            )
            + ("; logits at supervised positions only" if self.supervised_only else "")
        )


def choose_batching(
    train: TrainSpec,
    method: MethodSpec,
    model: torch.nn.Module,
    token_loss: bool,
    precision: str,
    rows: list[EncodedRow],
) -> Batching:
    """Packing, length grouping and supervised-only logits, as far as the method and model allow.
    `token_loss`: the loss is over tokens (a causal LM); without it (a task head makes one
    prediction per row) there is nothing to pack or pick."""
    attn = _compat.attention_implementation(model)
    packing = token_loss and resolve_packing(train, method, attn)
    supervised_only = (
        token_loss
        and train.supervised_logits_only
        and not method.virtual_tokens
        and accepts_logits_to_keep(model)
    )
    lengths = None if packing or not train.group_by_length else row_lengths(rows)
    # On CPU under bf16, packed lengths are rounded up to few distinct shapes (see collate_packed).
    multiple = pack_multiple(precision, torch.cuda.is_available())
    budget = None
    if train.micro_batch_tokens is not None:
        if not packing:
            raise RecipeError(
                "train.micro_batch_tokens cuts packed micro-batches, but this model's attention "
                f"({attn}) does not pack rows: remove it or set model.attn_implementation: sdpa"
            )
        budget = TokenBudget(row_lengths(rows), train.micro_batch_tokens)
    return Batching(packing, supervised_only, packing and attn == "sdpa", multiple, lengths, budget)
