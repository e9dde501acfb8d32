"""Causal-LM loss as a *sum* over supervised tokens, so callers can normalise by the token count of
the whole optimizer step (not by a mean of per-micro-batch means).

    loss_sum = sum over supervised t of  -log softmax(W h_t)[y_{t+1}]

With `supervised_only`, the model projects to the vocabulary only at the positions t whose next
token carries a label (transformers' `logits_to_keep`, which also applies any logit soft-capping
or scaling the architecture has), and the fp32 softmax runs over chunks of those rows under
activation checkpointing: neither (tokens x vocab) logits nor their fp32 log-softmax are kept.
The sum is the same as the plain computation's, up to float summation order. Where the logits
are the head applied to the last hidden state, up to a known soft-cap or scale
(`linear_ce.fused_head`), the projection and the cross-entropy run fused instead: each chunk's
logits are made, used and freed in the forward.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peftkit.data.encode import IGNORE
from peftkit.kernels.chunked_ce import chunked_cross_entropy_sum, chunked_cross_entropy_terms
from peftkit.kernels.linear_ce import fused_head, linear_cross_entropy_sum, logit_map
from peftkit.models.layers import unwrap_peft


def supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted positions that carry loss (labels are shifted by one inside the loss).

    A task head's labels are one per row, (batch,): every row is one prediction."""
    if labels.dim() == 1:
        return torch.tensor(labels.shape[0], device=labels.device)
    return (labels[:, 1:] != IGNORE).sum()


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's causal-LM forward takes `logits_to_keep` (transformers >= 4.50)."""
    base = unwrap_peft(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def causal_lm_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool = False
) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions of one micro-batch.

    `batch` is padded (input_ids, attention_mask, labels) or packed (input_ids, position_ids,
    labels, optionally cu_seq_lens_q; see `batches.collate_packed`).
    """
    head = fused_head(model) if supervised_only else None
    if head is not None:  # projection and cross-entropy fused: no logits kept (linear_ce.py)
        hidden, targets, dtype = _hidden_and_targets(model, head, batch)
        return linear_cross_entropy_sum(
            hidden, head.weight, targets, dtype=dtype, logit_map=logit_map(model)
        )
    logits, targets, _ = _logits_and_targets(model, batch, supervised_only)
    return chunked_cross_entropy_sum(logits, targets)


def causal_lm_token_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy per predicting position (0 where the target is IGNORE), for
    losses split by row (per-task metrics). Returns (losses (batch, positions) fp32, kept
    positions or None = all seq - 1); `losses.sum()` is `causal_lm_loss_sum` up to float order.
    """
    logits, targets, keep = _logits_and_targets(model, batch, supervised_only)
    return chunked_cross_entropy_terms(logits, targets).reshape(targets.shape), keep


def _inputs_and_targets(
    batch: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The model's inputs, the token each position predicts (batch, seq - 1), and the positions
    predicting a label in any row."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    return {k: v for k, v in batch.items() if k != "labels"}, targets, keep


def _logits_and_targets(
    model: nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    labels = batch["labels"]
    inputs, targets, keep = _inputs_and_targets(batch)
    if supervised_only:
        logits = model(
            **inputs, use_cache=False, logits_to_keep=keep
        ).logits  # (batch, kept, vocab)
        targets = targets[:, keep.to(targets.device)]
    else:
        keep = None
        logits = model(**inputs, use_cache=False).logits
        # Prompt tuning prepends virtual tokens to the logits; keep the positions of the real tokens.
        logits = logits[:, -labels.shape[1] :][:, :-1]  # (batch, seq - 1, vocab)
    return logits, targets.to(logits.device), keep


def _hidden_and_targets(
    model: nn.Module, head: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """The last hidden states at the positions predicting a label, those labels, and the dtype
    the head computed in (under autocast, the half type even for fp32 weights)."""
    inputs, targets, keep = _inputs_and_targets(batch)
    # The model hands its head the last hidden state at the kept positions (`logits_to_keep`):
    # a pre-hook takes that input and gives the head zero rows instead, so no logits are made and
    # no layer's hidden state is returned (no `output_hidden_states`, whose list accelerate would
    # cast to fp32). The head's zero-row output says which dtype it computes in (autocast's, if
    # any): the model's outputs may be cast to fp32 on the way out (accelerate does).
    taken: dict[str, object] = {}

    def take_input(module, args):
        taken["hidden"] = args[0]  # (batch, kept, hidden)
        return (args[0][..., :0, :], *args[1:])

    def note_dtype(module, args, output):
        taken["dtype"] = output.dtype

    hooks = [head.register_forward_pre_hook(take_input), head.register_forward_hook(note_dtype)]
    try:
        model(**inputs, use_cache=False, logits_to_keep=keep)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = taken["hidden"]
    return hidden, targets.to(hidden.device)[:, keep.to(hidden.device)], taken["dtype"]
