"""BOFT: butterfly orthogonal fine-tuning, through peft. Like OFT (W = R W0, R orthogonal) but R is a
product of sparse butterfly factors of small orthogonal blocks, so it mixes all of W0's inputs
with few parameters. Starts from R = I. Mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import BOFTConfig
    from torch import nn


@register
class BoftSpec(PeftMethod):
    """BOFT: butterfly-factored orthogonal rotations of the chosen linear layers."""

    method: Literal["boft"] = "boft"
    mergeable: ClassVar[bool] = True
    block_size: int = Field(default=4, gt=0)
    """Size of the orthogonal blocks (must divide the adapted layers' input size)."""
    butterfly_factors: int = Field(default=1, gt=0)
    """Number of butterfly factors: more = wider mixing, more parameters."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> BOFTConfig:
        from peft import BOFTConfig

        return BOFTConfig(
            task_type=ctx.task_type,
            boft_block_size=self.block_size,
            boft_block_num=0,
            boft_n_butterfly_factor=self.butterfly_factors,
            target_modules=self.target_modules,
            boft_dropout=self.dropout,
        )
