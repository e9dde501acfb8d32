"""fp32 cross-entropy over logits that are already made, a chunk of rows at a time.

    loss_sum = sum over rows i with a target of  logsumexp(z_i) - z_i[y_i]   (in fp32)

The plain path of the loss when the head cannot run fused (`linear_ce.py`): each chunk's fp32
log-softmax is checkpointed when gradients flow, so the backward recomputes it instead of
keeping one fp32 copy of every row's logits alive. The transient fp32 memory is
CE_CHUNK_ROWS x vocab x 4 bytes (what the memory planner counts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peftkit.data.encode import IGNORE

CE_CHUNK_ROWS = 1024
"""Rows of logits per fp32 cross-entropy chunk: the transient fp32 memory is chunk x vocab x 4 B."""


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def _ce_terms(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")


def chunked_cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CE_CHUNK_ROWS
) -> torch.Tensor:
    """sum of fp32 cross-entropy over non-IGNORE targets, `chunk_rows` logit rows at a time."""
    total = logits.new_zeros((), dtype=torch.float32)
    for part in _chunked(_ce_sum, logits, targets, chunk_rows):
        total = total + part
    return total


def chunked_cross_entropy_terms(
    logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CE_CHUNK_ROWS
) -> torch.Tensor:
    """fp32 cross-entropy of every row (0 where the target is IGNORE), flat (rows,)."""
    return torch.cat(_chunked(_ce_terms, logits, targets, chunk_rows))


def _chunked(
    fn, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CE_CHUNK_ROWS
) -> list[torch.Tensor]:
    """`fn(logits, targets)` over `chunk_rows` logit rows at a time.

    Each chunk is checkpointed when gradients flow, so backward recomputes its fp32 log-softmax
    instead of keeping all of them alive at once.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (rows, vocab)
    # split, not slicing: a split's backward is one concatenation, while each slice's backward
    # would fill a zero tensor the size of all the logits.
    return [
        checkpoint(fn, *args, use_reentrant=False) if flat.requires_grad else fn(*args)
        for args in zip(flat.split(chunk_rows), targets.reshape(-1).split(chunk_rows), strict=True)
    ]
