"""Causal-LM loss as a *sum* over supervised tokens, so callers can normalise by the token count of
the whole optimizer step (not by a mean of per-micro-batch means)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.data.encode import IGNORE


def supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of predicted positions that carry loss (labels are shifted by one inside the loss)."""
    return (labels[:, 1:] != IGNORE).sum()


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions of one micro-batch."""
    labels = batch["labels"]
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    # Prompt tuning prepends virtual tokens to the logits; keep the positions of the real tokens.
    logits = out.logits[:, -labels.shape[1] :]  # (batch, seq, vocab)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
