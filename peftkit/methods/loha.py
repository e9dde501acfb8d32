"""LoHa (LyCORIS): a low-rank Hadamard-product update, through peft.

    delta W = (alpha / r) (B1 A1) ⊙ (B2 A2)

with two rank-r pairs; the element-wise product reaches rank up to r^2 for the parameters of
2r. B2 starts at zero, so training starts from the base model. Mergeable into the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import LoHaConfig
    from torch import nn


@register
class LoHaSpec(PeftMethod):
    """LoHa: Hadamard product of two low-rank updates on the chosen linear layers."""

    method: Literal["loha"] = "loha"
    mergeable: ClassVar[bool] = True
    r: int = Field(default=8, gt=0)
    """Rank of each of the two factor pairs."""
    alpha: float = Field(default=8, gt=0)
    """Scale numerator: the update is scaled by alpha / r."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    exclude_modules: list[str] | None = None
    rank_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the rank dimension during training."""
    module_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Probability of skipping a module's update during a training step."""

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> LoHaConfig:
        from peft import LoHaConfig

        return LoHaConfig(
            task_type=ctx.task_type,
            r=self.r,
            alpha=self.alpha,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
        )
