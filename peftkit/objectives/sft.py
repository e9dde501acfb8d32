"""Supervised fine-tuning of a causal LM (`objective: sft`, the default): next-token cross-entropy
on the supervised tokens (assistant turns or completions, by `data.loss_on`), padded or packed.

    loss = sum over supervised tokens t of -log p(x_t | x_<t) / number of supervised tokens

The runtime is `peftkit.objectives.causal_lm.CausalLM`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from peftkit.data.pipeline import PreparedData, prepare_data
from peftkit.objectives.base import BuildContext, ObjectiveKind, RecipeView
from peftkit.objectives.registry import register
from peftkit.section import Section

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from peftkit.objectives.runtime import Objective


class SFTObjective(Section):
    """Supervised fine-tuning: cross-entropy on the supervised tokens (or a task head's loss)."""

    type: Literal["sft"] = "sft"

    @property
    def needs_reference(self) -> bool:
        return False


def causal_lm_rules(recipe: RecipeView) -> list[str]:
    """What every objective that trains the LM head asks of the adapter method."""
    if recipe.adapter.causal_lm:
        return []
    return [
        f"adapter.method {recipe.adapter.method!r} trains a new task head: set task.type to "
        "classification or regression"
    ]


class SFT(ObjectiveKind):
    """Next-token cross-entropy on the supervised tokens."""

    name = "sft"
    spec = SFTObjective
    summary_line = "Next-token cross-entropy on the supervised tokens of chats or completions."

    @classmethod
    def rules(cls, recipe: RecipeView) -> list[str]:
        return causal_lm_rules(recipe)

    @classmethod
    def prepare_data(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> tuple[PreparedData, list[str] | None]:
        return prepare_data(recipe.data, tokenizer, seed), None

    @classmethod
    def build(cls, ctx: BuildContext) -> Objective:
        from peftkit.objectives.causal_lm import CausalLM, run_batching

        return CausalLM(run_batching(ctx), ctx.tokenizer.pad_token_id)


register(SFT)
