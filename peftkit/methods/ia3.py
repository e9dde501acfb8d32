"""IA3: learned rescaling vectors on attention keys/values and the feed-forward input.

y = l ⊙ (W0 x) for attention targets and y = W0 (l ⊙ x) for feed-forward targets; only the
vectors l (initialised to 1) are trained, typically ~0.01% of the parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import IA3Config
    from torch import nn


@register
class IA3Spec(PeftMethod):
    """IA3 through peft; target modules default to peft's per-architecture choice."""

    method: Literal["ia3"] = "ia3"
    mergeable: ClassVar[bool] = True
    target_modules: list[str] | None = None
    """Modules to rescale (null = peft's default for the architecture, e.g. k/v/down proj)."""
    feedforward_modules: list[str] | None = None
    """Subset of target_modules whose *input* is rescaled."""

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> IA3Config:
        from peft import IA3Config

        return IA3Config(
            task_type=ctx.task_type,
            target_modules=self.target_modules,
            feedforward_modules=self.feedforward_modules,
        )
