"""MiSS (formerly Bone): a shared trained matrix expanded over blocks of each weight, through peft:
W = W0 + expand(D), with D of shape (r, out) tiled over the input in blocks of r. Starts at
D = 0. Mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import MissConfig
    from torch import nn


@register
class MissSpec(PeftMethod):
    """MiSS: one small matrix per layer, tiled over the weight's input dimension."""

    method: Literal["miss"] = "miss"
    mergeable: ClassVar[bool] = True
    r: int = Field(default=64, gt=0)
    """Block size (must divide the adapted layers' input size)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> MissConfig:
        from peft import MissConfig

        return MissConfig(
            task_type=ctx.task_type,
            r=self.r,
            target_modules=self.target_modules,
            miss_dropout=self.dropout,
        )
