"""VeRA: one pair of frozen random low-rank matrices shared by every layer, and per-layer scaling
vectors, through peft:

    delta W = Lambda_b B Lambda_d A        (A, B random and frozen; only b and d train)

so the trainable count is tiny (~r + out per layer) even at a high rank. Mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import VeraConfig
    from torch import nn


@register
class VeraSpec(PeftMethod):
    """VeRA: trained scaling vectors around shared frozen random projections."""

    method: Literal["vera"] = "vera"
    mergeable: ClassVar[bool] = True
    r: int = Field(default=256, gt=0)
    """Rank of the shared random projections (cheap: they are frozen)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    d_initial: float = Field(default=0.1, gt=0)
    """Initial value of the d vector (b starts at zero, so training starts from the base)."""

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> VeraConfig:
        from peft import VeraConfig

        return VeraConfig(
            task_type=ctx.task_type,
            r=self.r,
            target_modules=self.target_modules,
            vera_dropout=self.dropout,
            d_initial=self.d_initial,
        )
