"""Soft prompts: prompt tuning and prefix tuning, through peft.

Prompt tuning prepends n trainable embeddings P (n x d) to the input:  h = [P; E(x)].
Prefix tuning prepends trainable key/value vectors to every attention layer, so each layer
attends to [K_prefix; K(x)] and [V_prefix; V(x)]. Neither changes the base weights, so neither
can be merged into them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from peftkit.methods.base import ApplyContext, RecipeView
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import PrefixTuningConfig, PromptTuningConfig
    from torch import nn


@register
class PromptTuningSpec(PeftMethod):
    """Prompt tuning: a trainable soft prompt in front of every input."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    virtual_tokens: ClassVar[bool] = True
    task_heads: ClassVar[bool] = False
    num_virtual_tokens: int = Field(default=20, gt=0)
    """Length of the soft prompt."""
    init_text: str | None = None
    """Initialise the soft prompt from the embeddings of this text (else random)."""

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> PromptTuningConfig:
        from peft import PromptTuningConfig

        if self.init_text is None:
            return PromptTuningConfig(
                task_type=ctx.task_type, num_virtual_tokens=self.num_virtual_tokens
            )
        return PromptTuningConfig(
            task_type=ctx.task_type,
            num_virtual_tokens=self.num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=self.init_text,
            tokenizer_name_or_path=ctx.tokenizer_path,
        )


@register
class PrefixTuningSpec(PeftMethod):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    virtual_tokens: ClassVar[bool] = True
    task_heads: ClassVar[bool] = False
    num_virtual_tokens: int = Field(default=20, gt=0)
    projection: bool = False
    """Reparametrise the prefix through a 2-layer MLP (more stable, more parameters while training)."""
    projection_hidden: int = Field(default=512, gt=0)

    def check_recipe(self, recipe: RecipeView) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.train.gradient_checkpointing:
            problems.append(
                "peft's prefix tuning refuses gradient checkpointing (its prefix is passed as a KV "
                "cache): set train.gradient_checkpointing: false"
            )
        return problems

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> PrefixTuningConfig:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=ctx.task_type,
            num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.projection,
            encoder_hidden_size=self.projection_hidden,
        )
