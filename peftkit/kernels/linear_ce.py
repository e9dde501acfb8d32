"""Vocabulary projection and cross-entropy in one pass, chunk by chunk: no logits are kept.

    z_i = f(W h_i),   loss_sum = sum over rows i with a target of  logsumexp(z_i) - z_i[y_i]
    d loss / d h_i = W^T g_i,   d loss / d W = sum_i g_i h_i^T,
    g_i = f'(W h_i) * (softmax(z_i) - onehot(y_i))

where f is what the architecture applies after the head (`LogitMap`): a scale s (Cohere's
`logit_scale`, Granite's 1 / `logits_scaling`) and a soft-cap c (Gemma 2/3's
`final_logit_softcapping`), f(l) = c tanh(s l / c), f'(l) = s (1 - (f(l) / c)^2); identity for
most decoders.

The plain way projects every kept row to the vocabulary, keeps those (rows x vocab) logits for the
backward and runs the fp32 log-softmax twice (once more when its checkpointed chunk is
recomputed). `LinearCrossEntropy` computes each chunk's logits, its loss and its gradient with
respect to h (and W, when W trains) during the forward, keeps only those gradients (rows x hidden)
and frees the logits: the backward only scales them by the incoming gradient. The same math as
`F.cross_entropy(f(F.linear(h, W)).float(), y, reduction="sum")`, to float rounding (tests).

Loss scaling (fp16): the gradient is made before the loss scale is known, so under fp16 its
small entries (the probabilities of unlikely tokens, all of g once the model is confident) would
flush to zero when cast for the product with W. They are cast multiplied by a power of two
instead, as large as W allows without overflow, and the kept gradient stays fp32; the backward
divides it out again, times the incoming (scaled) gradient, before casting to h's dtype.

`fused_head(model)` says whether a model's logits are `f(lm_head(last hidden state))` for a
known f: the architectures in HEAD_LOGITS, a plain linear head without bias, weights that are
ordinary tensors (not sharded).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.data.encode import IGNORE
from peftkit.models.layers import unwrap_peft


@dataclass(frozen=True)
class LogitMap:
    """What an architecture applies to its head's output: logits = cap tanh(scale l / cap)."""

    scale: float = 1.0
    softcap: float | None = None


def _plain(config) -> LogitMap:
    return LogitMap()


def _softcapped(config) -> LogitMap:
    return LogitMap(softcap=getattr(config, "final_logit_softcapping", None))


def _scaled(config) -> LogitMap:  # Cohere: logits * logit_scale
    return LogitMap(scale=float(config.logit_scale))


def _divided(config) -> LogitMap:  # Granite (muP): logits / logits_scaling
    return LogitMap(scale=1.0 / float(config.logits_scaling))


HEAD_LOGITS: dict[str, Callable[[object], LogitMap]] = {
    **dict.fromkeys(
        (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
            "smollm3", "gemma", "olmo", "olmo2", "starcoder2", "stablelm", "glm", "glm4",
            "helium", "nemotron", "exaone4", "arcee", "apertus", "ernie4_5", "seed_oss",
        ),
        _plain,
    ),
    "gemma2": _softcapped,
    "gemma3_text": _softcapped,
    "cohere": _scaled,
    "cohere2": _scaled,
    "granite": _divided,
    "granitemoe": _divided,
}  # fmt: skip
"""Model types whose causal-LM logits are f(lm_head(hidden_states[-1])), with f read from the
config. Each is tested against the model's own logits (tests/unit/test_linear_ce.py)."""

FUSED_HEAD_TYPES = frozenset(HEAD_LOGITS)

CALLS: Counter[str] = Counter()
"""Calls of `linear_cross_entropy_sum`: `training` (autograd on), `other` (evaluation)."""

CHUNK_ROWS = 256
"""Most rows per chunk (fewer at large vocabularies, `rows_per_chunk`)."""
CHUNK_ELEMENTS = 2**24
"""Most logits per chunk: each fp32 (chunk, vocab) buffer is at most 64 MiB."""


def rows_per_chunk(vocab: int) -> int:
    """Rows per chunk at this vocabulary size: 256 up to a 64k vocabulary, 64 at Gemma's 262k."""
    return max(16, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1)))


def chunk_bytes(vocab: int, compute_bytes: int, softcap: bool, rows: int | None = None) -> int:
    """Peak transient bytes of one chunk: two fp32 (chunk, vocab) buffers (logits, and
    logsumexp's or the soft-cap's), and the gradient cast to the compute dtype."""
    rows = rows_per_chunk(vocab) if rows is None else rows
    return rows * vocab * (4 * 2 + (4 if softcap else 0) + compute_bytes)


def _grad_prescale(w: torch.Tensor, dtype: torch.dtype) -> float:
    """A power of two k for fp16: k g @ W stays finite (|g| sums to <= 2 per row), and k g keeps
    the small probabilities that would flush to zero. 1 for wider types."""
    if dtype != torch.float16:
        return 1.0
    biggest = float(w.abs().max()) if w.numel() else 0.0
    if not math.isfinite(biggest) or biggest == 0:
        return 1.0
    return float(2 ** min(24, max(0, math.floor(math.log2(2**13 / biggest)))))


class LinearCrossEntropy(torch.autograd.Function):
    """sum of fp32 cross-entropy of f(F.linear(h, W)) against y (IGNORE rows excluded)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, scale, softcap):
        # h (rows, hidden), targets (rows,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(dtype)  # the dtype the head computes in (autocast's, under mixed precision)
        k = _grad_prescale(w, dtype) if ctx.needs_input_grad[0] else 1.0
        keep_dtype = torch.float32 if k != 1.0 else h.dtype
        dh = torch.empty_like(h, dtype=keep_dtype) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_c, y_c = h[rows].to(dtype), targets[rows]
            logits = F.linear(h_c, w).float()  # (chunk, vocab)
            if scale != 1.0:
                logits.mul_(scale)
            capped = None
            if softcap is not None:
                capped = logits.div_(softcap).tanh_()  # tanh(z / c), in place
                logits = capped * softcap  # the model's logits z
            valid = y_c != IGNORE
            y_safe = torch.where(valid, y_c, 0)
            lse = torch.logsumexp(logits, dim=-1)  # (chunk,)
            picked = logits.gather(1, y_safe[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if dh is None and dw is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(y_c), device=h.device), y_safe] -= 1.0
            grad.mul_(valid[:, None])
            if capped is not None:  # d z / d l = s (1 - tanh^2)
                grad.mul_(capped.square_().neg_().add_(1.0))
                del capped
            if scale != 1.0:
                grad.mul_(scale)
            if dw is not None:
                dw.addmm_(grad.t(), h_c.float())
            if dh is not None:
                dh[rows] = (grad.mul_(k) if k != 1.0 else grad).to(dtype) @ w  # (chunk, hidden)
            del logits, grad  # free this chunk before the next one's logits exist
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.weight_dtype, ctx.prescale = h.dtype, weight.dtype, k
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh = (dh * (grad_out.to(dh.dtype) / ctx.prescale)).to(ctx.h_dtype)
        return (
            dh,
            (dw * grad_out).to(ctx.weight_dtype) if dw is not None else None,
            *(None,) * 5,
        )


def linear_cross_entropy_sum(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    dtype: torch.dtype | None = None,
    logit_map: LogitMap | None = None,
) -> torch.Tensor:
    """Σ cross-entropy(f(W h_i), y_i) over rows with a target; h (..., hidden), targets (...).

    Args:
        chunk_rows: rows per chunk (default: `rows_per_chunk(vocab)`).
        dtype: what the projection computes in (default h's); the loss is fp32 either way.
        logit_map: f, what the architecture applies after the head (default: nothing).
    """
    f = logit_map or LogitMap()
    CALLS["training" if torch.is_grad_enabled() else "other"] += 1
    rows = chunk_rows or rows_per_chunk(weight.shape[0])
    return LinearCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]),
        weight,
        targets.reshape(-1),
        rows,
        dtype or h.dtype,
        f.scale,
        f.softcap,
    )


def logit_map(model: nn.Module) -> LogitMap:
    """f of the model's architecture (see `HEAD_LOGITS`; call only where `fused_head` is not None)."""
    config = unwrap_peft(model).config
    return HEAD_LOGITS[config.model_type](config)


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer if its logits are f(that layer of the last hidden state)."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (
        getattr(config, "model_type", None) not in HEAD_LOGITS
        or type(head) is not nn.Linear
        or head.bias is not None
        or type(head.weight.data) is not torch.Tensor  # a sharded (DTensor) weight
        or hasattr(head.weight, "ds_id")  # DeepSpeed ZeRO-3: whole only inside the head's forward
    ):
        return None
    return head
