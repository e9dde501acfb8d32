"""Vocabulary projection and cross-entropy in one pass, chunk by chunk: no logits are kept.

    loss_sum = sum over rows i with a target of  logsumexp(W h_i) - (W h_i)[y_i]
    d loss / d h_i = W^T (softmax(W h_i) - onehot(y_i)),   d loss / d W = sum_i (...) h_i^T

The plain way projects every kept row to the vocabulary, keeps those (rows x vocab) logits for the
backward and runs the fp32 log-softmax twice (once more when its checkpointed chunk is
recomputed). `LinearCrossEntropy` computes each chunk's logits, its loss and its gradient with
respect to h (and W, when W trains) during the forward, keeps only those gradients (rows x hidden)
and frees the logits: the backward only scales them by the incoming gradient. The same math as
`F.cross_entropy(F.linear(h, W).float(), y, reduction="sum")`, to float rounding (tests).

`fused_head(model)` says whether a model's logits are exactly `lm_head(last hidden state)`: the
architectures listed in FUSED_HEAD_TYPES (no logit soft-capping or scaling), a plain linear head
without bias, weights that are ordinary tensors (not sharded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.data.encode import IGNORE
from peftkit.models.layers import unwrap_peft

FUSED_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3"})
"""Model types whose causal-LM logits are `lm_head(hidden_states[-1])`, nothing applied after."""

CHUNK_ROWS = 256
"""Rows per chunk: the transient memory is CHUNK_ROWS x vocab x 4 B (50 MB at a 49k vocabulary)."""


class LinearCrossEntropy(torch.autograd.Function):
    """sum of fp32 cross-entropy of F.linear(h, W) against y (IGNORE rows excluded)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, dtype):  # h (rows, hidden), targets (rows,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.to(dtype)  # the dtype the head computes in (autocast's, under mixed precision)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h_c, y_c = h[rows].to(dtype), targets[rows]
            logits = F.linear(h_c, w).float()  # (chunk, vocab)
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
            if dh is not None:
                dh[rows] = grad.to(dtype) @ w  # (chunk, hidden)
            if dw is not None:
                dw.addmm_(grad.t(), h_c.float())
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        return (
            dh * grad_out.to(dh.dtype) if dh is not None else None,
            (dw * grad_out).to(ctx.weight_dtype) if dw is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = CHUNK_ROWS,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Σ cross-entropy(W h_i, y_i) over rows with a target; h (..., hidden), targets (...).

    `dtype`: what the projection computes in (default h's); the loss is fp32 either way."""
    return LinearCrossEntropy.apply(
        h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk_rows, dtype or h.dtype
    )


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer if its logits are exactly that layer of the last hidden state."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (
        getattr(config, "model_type", None) not in FUSED_HEAD_TYPES
        or type(head) is not nn.Linear
        or head.bias is not None
        or type(head.weight.data) is not torch.Tensor  # a sharded (DTensor) weight
        or hasattr(head.weight, "ds_id")  # DeepSpeed ZeRO-3: whole only inside the head's forward
    ):
        return None
    return head
