"""A recipe's data, by its objective: one path for `peftkit prepare` and for training (read ->
split -> encode by the objective's row kind -> the data cache, or memory with `data.cache: false`),
and each run's start recorded so a later `peftkit prepare` maps it without loading the tokenizer
(`peftkit.data.cache.starts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.data.cache import starts
from peftkit.data.pipeline import PreparedData
from peftkit.objectives.base import RecipeView
from peftkit.objectives.registry import objective_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prepare_run_data(
    recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[PreparedData, list[str] | None]:
    """(prepared data, class names or None) for the recipe's objective. Data found in or added to
    the data cache is recorded under the recipe's start key, as `peftkit prepare` records it."""
    data, names = objective_for(recipe).prepare_data(recipe, tokenizer, seed)
    starts.remember(starts.key_of(recipe), data)
    return data, names
