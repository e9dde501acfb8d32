"""Weights and optimizer state split over processes (FSDP2: parameters are DTensors).

Each process holds a shard of every parameter (`p.to_local()`) and the optimizer state of its
shards. Saving an adapter gathers only the *trainable* parameters (`full_tensor()`, a collective
every process joins) into the main process; the frozen base is never gathered. Checkpoints keep
every process's shards as they are (one file per process), so a resume with the same number of
processes continues exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed support
    DTensor = ()  # type: ignore[assignment,misc]


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: Any) -> Any:
    """A DTensor's shard on this process; anything else as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_zero3_partitioned(model: nn.Module) -> bool:
    """DeepSpeed ZeRO-3: each parameter holds only this process's partition (`ds_id` marks it)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered_trainable(model: nn.Module, keep: bool) -> Iterator[None]:
    """Within the block, the trainable parameters of `model` are whole, plain tensors in the
    process(es) with `keep` (others only take part in the gathering). Every process must enter.
    Under ZeRO-3 DeepSpeed's `GatheredParameters` gathers them (on every process), read-only."""
    if is_zero3_partitioned(model):
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            yield
        return
    # Public nn.Module API only: assigning a Parameter to a module attribute registers it (what
    # torch's own FSDP does when a module overrides __setattr__), no private _parameters dict.
    swapped = []
    for module in model.modules():
        own = list(module.named_parameters(recurse=False, remove_duplicate=False))
        for name, p in own:
            if not p.requires_grad or not isinstance(p, DTensor):
                continue
            full = p.full_tensor()  # collective: every process, same order
            if keep:
                setattr(module, name, nn.Parameter(full, requires_grad=True))
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            setattr(module, name, p)


def local_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This process's shard of every trainable parameter."""
    return {
        n: local(p).detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with every DTensor replaced by this process's shard."""
    state = optimizer.state_dict()
    return {
        **state,
        "state": {i: {k: local(v) for k, v in s.items()} for i, s in state["state"].items()},
    }


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `local_optimizer_state`: shards become DTensors shaped like their parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def restore(i: int, v: Any) -> Any:
        p = params[int(i)]
        if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.to_local().shape:
            return DTensor.from_local(
                v.to(p.to_local().device),
                p.device_mesh,
                p.placements,
                shape=p.shape,
                stride=p.stride(),
                run_check=False,
            )
        return v

    optimizer.load_state_dict(
        {
            **state,
            "state": {
                i: {k: restore(i, v) for k, v in s.items()} for i, s in state["state"].items()
            },
        }
    )
