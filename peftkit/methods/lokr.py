"""LoKr (LyCORIS): a Kronecker-product update, through peft.

    delta W = (alpha / r) C ⊗ (B A)

with a small dense factor C and a rank-r factor B A whose shapes multiply to W's; far fewer
parameters than LoRA at a given rank. Mergeable into the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import LoKrConfig
    from torch import nn


@register
class LoKrSpec(PeftMethod):
    """LoKr: Kronecker product of a small dense and a low-rank factor on the chosen linears."""

    method: Literal["lokr"] = "lokr"
    mergeable: ClassVar[bool] = True
    r: int = Field(default=8, gt=0)
    """Rank of the low-rank factor."""
    alpha: float = Field(default=8, gt=0)
    """Scale numerator: the update is scaled by alpha / r."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    exclude_modules: list[str] | None = None
    decompose_both: bool = False
    """Also factor the small Kronecker factor into low rank."""
    decompose_factor: int = -1
    """Size of the Kronecker split (-1: as square as the shape allows)."""
    rank_dropout: float = Field(default=0.0, ge=0, lt=1)
    module_dropout: float = Field(default=0.0, ge=0, lt=1)

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> LoKrConfig:
        from peft import LoKrConfig

        return LoKrConfig(
            task_type=ctx.task_type,
            r=self.r,
            alpha=self.alpha,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            decompose_both=self.decompose_both,
            decompose_factor=self.decompose_factor,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
        )
