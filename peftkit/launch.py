"""How this process was launched (one process, DDP, FSDP, DeepSpeed), and what each launch refuses.

`accelerate launch --config_file recipes/accelerate/<name>.yaml` passes its choice to every
process in environment variables (ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_USE_DEEPSPEED, ...);
peftkit reads them here, before any model loads, so that a combination that cannot work is
refused with its reason instead of failing (or hanging) in the middle of training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from peftkit.errors import RecipeError

if TYPE_CHECKING:  # read only: the launch sits below the recipe (models/load.py asks it too)
    from peftkit.recipe.schema import Recipe

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

    def problems(self, recipe: Recipe) -> list[str]:
        """What the recipe asks for that this launch cannot do, each with what to change."""
        if not self.shards_state:
            return []
        name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[self.kind]
        problems = []
        if recipe.output.sample_prompts or recipe.eval.metric != "none":
            problems.append(
                f"output.sample_prompts / eval.metric generate text on one process, which a "
                f"{name} model (its weights split over processes) cannot do: remove them, or "
                "generate from the saved adapter afterwards (peftkit generate)"
            )
        if recipe.adapter.full_weights:  # the registry's capability: its result is a whole model
            problems.append(
                f"adapter.method {recipe.adapter.method} under {name}: saving the whole sharded "
                "model is not supported yet; use an adapter method (lora, qlora, ia3, ...) or DDP"
            )
        if self.kind == "deepspeed":
            problems += _deepspeed_problems(recipe)
        return problems


def _deepspeed_problems(recipe: Recipe) -> list[str]:
    t = recipe.train
    problems = []
    if t.grad_accum > 1:
        problems.append(
            "train.grad_accum > 1 under DeepSpeed: its engine steps the optimizer after every "
            "backward, so peftkit's accumulation would take several steps; set train.grad_accum: 1 "
            "and a larger train.micro_batch_size, or use FSDP (recipes/accelerate/fsdp2.yaml)"
        )
    if t.save_every is not None:
        problems.append(
            "train.save_every under DeepSpeed: peftkit's checkpoints do not hold ZeRO's "
            "partitioned optimizer state, so a resume would not continue exactly; set "
            "train.save_every: null, or use FSDP, whose sharded checkpoints resume exactly"
        )
    if t.max_grad_norm is not None:
        problems.append(
            "train.max_grad_norm under DeepSpeed: clipping is DeepSpeed's (gradient_clipping in "
            "its config); set train.max_grad_norm: null"
        )
    return problems


def check_launch(recipe: Recipe, launch: Launch | None = None) -> Launch:
    """The launch, after refusing (`RecipeError`) what it cannot run. Loads nothing."""
    launch = launch or Launch.from_env()
    problems = launch.problems(recipe)
    if problems:
        raise RecipeError(
            f"this recipe cannot run under {launch.kind} ({launch.processes} processes):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return launch
