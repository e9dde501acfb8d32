"""The optimizer and the learning-rate schedule a `TrainSpec` describes."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from peftkit.recipe.schema import TrainSpec


def build_optimizer(
    spec: TrainSpec, model: nn.Module, lr_scales: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms and 1-d vectors.

    `lr_scales` (parameter name -> factor, from layer-wise lr decay) splits the parameters further
    into one group per factor at `lr x factor`: factor 1 first (group 0 carries `lr`, the lr that
    is logged), then the others largest first (LoRA+'s B at `lr x ratio`; lower layers' decay).
    Each group keeps its factor under `lr_scale`.
    """
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = 1.0 if lr_scales is None else lr_scales.get(name, 1.0)
            buckets.setdefault((scale, p.ndim >= 2), []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": spec.weight_decay if decays else 0.0,
            "lr": spec.lr * scale,
            "lr_scale": scale,
        }
        for (scale, decays), params in sorted(
            buckets.items(), key=lambda kv: (kv[0][0] != 1.0, -kv[0][0], not kv[0][1])
        )
    ]
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


def combined_scales(
    *scales: dict[str, float] | None,
) -> dict[str, float] | None:
    """Per-parameter lr factors from several sources (layer decay, LoRA+), multiplied."""
    given = [s for s in scales if s is not None]
    if not given:
        return None
    names = set().union(*given)
    return {n: math.prod(s.get(n, 1.0) for s in given) for n in names}


def warmup_steps(spec: TrainSpec, total_steps: int) -> int:
    if spec.warmup_steps is not None:
        return min(spec.warmup_steps, total_steps)
    return math.ceil(spec.warmup_ratio * total_steps)


def build_scheduler(
    spec: TrainSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> LambdaLR:
    """Linear warmup, then cosine / linear decay to `min_lr_ratio * lr`, or constant.

    The factor of step k (0-based) is transformers' `get_{cosine,linear,constant}_schedule_with_
    warmup`: k / warmup during the warmup (so the first step runs at lr 0, as in the Trainer and
    TRL), then 0.5 (1 + cos(pi p)) or 1 - p with p = (k - warmup) / (total - warmup).
    """
    warmup = warmup_steps(spec, total_steps)
    floor = spec.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if spec.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        shape = (
            0.5 * (1 + math.cos(math.pi * progress)) if spec.scheduler == "cosine" else 1 - progress
        )
        return floor + (1 - floor) * shape

    return LambdaLR(optimizer, factor)


def gradient_norm(accelerator, model: nn.Module, max_norm: float | None) -> float:
    """The gradients' total norm, clipped to `max_norm` if set (call before the step)."""
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0  # one sync, no clipping
