"""Padding-free attention for packed rows on SDPA: one causal SDPA call per packed row.

transformers isolates packed rows under plain SDPA by building a (tokens x tokens) block-diagonal
mask, which makes SDPA take its masked, O(tokens^2) path over the whole micro-batch: packing 16
rows of ~200 tokens then costs more attention compute and memory than padding them. With
flash-attention, packed rows run as variable-length sequences instead. This module gives SDPA the
same: registered as an attention implementation of its own (transformers' AttentionInterface),
it reads the row boundaries `cu_seq_lens_q` that `collate_packed` passes through the model's
keyword arguments (the name flash-attention uses for them) and runs causal SDPA on each row, so
attention costs sum(len_i^2) and never builds a mask it uses. Every other call (padded batches,
generation with a cache) is plain SDPA.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from peftkit.models.layers import unwrap_peft

VARLEN_SDPA = "peftkit_varlen_sdpa"


def varlen_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,  # (batch, heads, q_len, head_dim)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = [b - a for a, b in itertools.pairwise(cu_seq_lens_q.tolist())]
    # split, not slicing: the backward of a split is one concatenation, while each slice's
    # backward fills a zero tensor the size of the whole micro-batch (time and memory per row).
    outs = [
        sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]  # (1, len_i, heads, head_dim)
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outs, dim=1), None


def register_varlen_sdpa() -> str:
    """Register the implementation (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    # Padded batches and generation still get SDPA's own masks.
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    return VARLEN_SDPA


def set_attention(model: nn.Module, name: str) -> None:
    """Switch a (possibly peft-wrapped) transformers model's attention implementation."""
    base = unwrap_peft(model)
    base.set_attn_implementation(name)
