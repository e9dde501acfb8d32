"""The optimizer and the learning-rate schedule a `TrainSpec` describes."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from peftkit.recipe.schema import TrainSpec


def build_optimizer(spec: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms and 1-d vectors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": spec.lr, "betas": spec.betas}
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[spec.optimizer]
    return cls(groups, **kwargs)


def warmup_steps(spec: TrainSpec, total_steps: int) -> int:
    if spec.warmup_steps is not None:
        return min(spec.warmup_steps, total_steps)
    return math.ceil(spec.warmup_ratio * total_steps)


def build_scheduler(
    spec: TrainSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> LambdaLR:
    """Linear warmup, then cosine / linear decay to `min_lr_ratio * lr`, or constant."""
    warmup = warmup_steps(spec, total_steps)
    floor = spec.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        shape = (
            0.5 * (1 + math.cos(math.pi * progress)) if spec.scheduler == "cosine" else 1 - progress
        )
        return floor + (1 - floor) * shape

    return LambdaLR(optimizer, factor)
