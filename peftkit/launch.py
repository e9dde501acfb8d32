"""How this process was launched (one process, DDP, FSDP, DeepSpeed).

`accelerate launch --config_file recipes/accelerate/<name>.yaml` passes its choice to every
process in environment variables (ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_USE_DEEPSPEED, ...);
peftkit reads them here, before any model loads. What each launch refuses of a recipe is
`peftkit.recipe.launch_rules` (the recipe sits above this module; model loading asks it too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from peftkit.errors import RecipeError

Kind = Literal["single", "ddp", "fsdp", "deepspeed"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Launch:
    kind: Kind
    processes: int
    reshard_after_forward: bool = True
    """FSDP: parameters are gathered per layer and freed again after its forward (ZeRO-3-like);
    false keeps them gathered until the backward (ZeRO-2-like)."""
    zero_stage: int | None = None
    """DeepSpeed: the ZeRO stage (2 or 3), when the launch says."""

    @property
    def shards_state(self) -> bool:
        """Optimizer state (and with FSDP or ZeRO-3 the parameters) split over the processes."""
        return self.kind in ("fsdp", "deepspeed")

    @property
    def shards_weights(self) -> bool:
        """Parameters split too: FSDP resharding after forward, or ZeRO-3."""
        return (self.kind == "fsdp" and self.reshard_after_forward) or self.zero_stage == 3

    def describe(self) -> str:
        how = {
            "single": "one process",
            "ddp": "DDP (nothing sharded)",
            "fsdp": "FSDP, "
            + (
                "weights, gradients and optimizer state sharded"
                if self.shards_weights
                else "gradients and optimizer state sharded"
            ),
            "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage}",
        }[self.kind]
        return f"{self.processes} process(es), {how}"

    @classmethod
    def from_accelerate_config(cls, path: str | Path) -> Launch:
        """The launch an `accelerate launch --config_file` file describes."""
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read the accelerate config {path}: {e}") from None
        processes = int(config.get("num_processes") or 1)
        kind = config.get("distributed_type", "NO")
        if kind == "FSDP":
            fsdp = config.get("fsdp_config") or {}
            reshard = fsdp.get("fsdp_reshard_after_forward", True)
            return cls("fsdp", processes, reshard_after_forward=str(reshard).lower() != "false")
        if kind == "DEEPSPEED":
            stage = (config.get("deepspeed_config") or {}).get("zero_stage")
            return cls("deepspeed", processes, zero_stage=int(stage) if stage else None)
        return cls("ddp" if processes > 1 else "single", processes)

    @classmethod
    def from_env(cls) -> Launch:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if _flag("ACCELERATE_USE_FSDP"):
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
            return cls(
                "fsdp", processes, reshard_after_forward=reshard not in ("false", "no_shard")
            )
        if _flag("ACCELERATE_USE_DEEPSPEED"):
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
            return cls("deepspeed", processes, zero_stage=int(stage) if stage else None)
        return cls("ddp" if processes > 1 else "single", processes)


def end_process_group() -> None:
    """Leave the processes' group once the work is done (every process together): a process that
    exits with its gloo or NCCL group still up can abort in the group's threads as the
    interpreter shuts down ("terminate called without an active exception"). Does nothing in a
    single process. What the command line calls after `peftkit train`; a notebook keeps its group."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # The finished run's modules (DDP, FSDP's device mesh) hold the groups in reference
        # cycles: collected now, while the interpreter is whole, not during its shutdown.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
