"""Padding-free attention for packed rows: flash-attention's varlen kernel, or one causal SDPA call
per packed row, with the row lengths read once per micro-batch on the host.

transformers isolates packed rows under plain SDPA by building a (tokens x tokens) block-diagonal
mask, which makes SDPA take its masked, O(tokens^2) path over the whole micro-batch: packing 16
rows of ~200 tokens then costs more attention compute and memory than padding them. This module
registers an attention implementation of its own (transformers' AttentionInterface) for packed
micro-batches. `collate_packed` computes the row boundaries on the host and passes them through
the model's keyword arguments: `cu_seq_lens_q/k` and `max_length_q/k` (flash-attention's names;
the tensors go to the device with the batch, the maxima stay Python ints) and `row_lengths` (a
tuple of ints). Each attention layer then runs

- `flash_attn_varlen_func` (flash-attn 2) when installed and the tensors are half precision on a
  GPU: one call for the whole micro-batch, attention costs sum(len_i^2);
- else causal SDPA on each row, split by `row_lengths`.

Neither reads a tensor back from the device (no per-layer sync) and no mask is built for a
packed call: the mask function registered with the implementation returns None while a forward
with `row_lengths` runs (`track_packed_forwards`), and builds SDPA's own mask for every other
call (padded batches, generation with a cache), which runs plain SDPA. transformers still looks
for packed rows in the position ids once per forward (one sync per forward, not per layer).
A sliding attention window (Mistral/Qwen2 `sliding_window`) is not applied within packed rows.
"""

from __future__ import annotations

import contextvars
import importlib.util
from collections import Counter

import torch
from torch import nn

from peftkit.models.layers import unwrap_peft

VARLEN_SDPA = "peftkit_varlen_sdpa"
CALLS: Counter[str] = Counter()
"""Attention calls of the registered implementation by kernel: flash_varlen, sdpa_per_row, sdpa."""
_PACKED = contextvars.ContextVar("peftkit_packed_forward", default=False)


def flash_varlen_available() -> bool:
    """flash-attn 2 is installed (its varlen kernel runs on CUDA in fp16/bf16)."""
    return importlib.util.find_spec("flash_attn") is not None


def varlen_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,  # (batch, heads, q_len, head_dim)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    row_lengths: tuple[int, ...] | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = row_lengths is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if not packed:
        CALLS["sdpa"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and flash_varlen_available()
    ):
        CALLS["flash_varlen"] += 1
        return _flash_varlen(module, query, key, value, cu_seq_lens_q, max_length_q, kwargs), None
    CALLS["sdpa_per_row"] += 1
    # split, not slicing: the backward of a split is one concatenation, while each slice's
    # backward fills a zero tensor the size of the whole micro-batch (time and memory per row).
    outs = [
        sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]  # (1, len_i, heads, head_dim)
        for q, k, v in zip(
            query.split(row_lengths, dim=2),
            key.split(row_lengths, dim=2),
            value.split(row_lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outs, dim=1), None


def _flash_varlen(module, query, key, value, cu_seq_lens, max_length, kwargs) -> torch.Tensor:
    """flash-attn 2's varlen kernel over the packed rows: (1, tokens, heads, head_dim)."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    cu = cu_seq_lens.to(torch.int32)
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_length,
        max_length,
        dropout_p=dropout,
        softmax_scale=kwargs.get("scaling"),
        causal=True,
    )
    return out[None]


def varlen_mask(*args, **kwargs):
    """No mask while a packed forward runs (the attention above never reads one); SDPA's own
    mask for every other call."""
    if _PACKED.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_varlen_sdpa() -> str:
    """Register the implementation (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_mask)
    return VARLEN_SDPA


def use_varlen_attention(model: nn.Module) -> str:
    """Switch the model to the varlen implementation, mask-free for packed forwards; its name."""
    set_attention(model, register_varlen_sdpa())
    track_packed_forwards(model)
    return VARLEN_SDPA


def track_packed_forwards(model: nn.Module) -> None:
    """Mark each forward of the (unwrapped) model given `row_lengths` as packed while it runs, so
    that `varlen_mask` builds no mask for it (forward hooks on the transformers model)."""
    base = unwrap_peft(model)
    tokens: list[contextvars.Token] = []

    def before(_module, _args, kwargs):
        tokens.append(_PACKED.set(kwargs.get("row_lengths") is not None))

    def after(_module, _args, _kwargs, _output):
        _PACKED.reset(tokens.pop())

    base.register_forward_pre_hook(before, with_kwargs=True)
    base.register_forward_hook(after, with_kwargs=True, always_call=True)


def set_attention(model: nn.Module, name: str) -> None:
    """Switch a (possibly peft-wrapped) transformers model's attention implementation."""
    base = unwrap_peft(model)
    base.set_attn_implementation(name)
