"""OFT: orthogonal fine-tuning, through peft. Each adapted weight is rotated, W = R W0, by a
block-diagonal orthogonal R (Cayley transform of a trained skew-symmetric matrix per block), which
keeps the angles between W0's neurons. Starts from R = I. Mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import OFTConfig
    from torch import nn


@register
class OftSpec(PeftMethod):
    """OFT: block-diagonal orthogonal rotations of the chosen linear layers."""

    method: Literal["oft"] = "oft"
    mergeable: ClassVar[bool] = True
    block_size: int = Field(default=32, gt=0)
    """Size of each orthogonal block (must divide the adapted layers' input size)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    module_dropout: float = Field(default=0.0, ge=0, lt=1)
    coft: bool = False
    """Constrained OFT: keep R within `eps` of the identity."""
    eps: float = Field(default=6e-5, gt=0)

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> OFTConfig:
        from peft import OFTConfig

        return OFTConfig(
            task_type=ctx.task_type,
            r=0,
            oft_block_size=self.block_size,
            target_modules=self.target_modules,
            module_dropout=self.module_dropout,
            coft=self.coft,
            eps=self.eps,
        )
