"""Choosing a run's objective and its data, once, at setup: from the recipe's `objective:` and
`task:` sections to the prepared rows and the `Objective` the loop holds (training/objective.py
defines the interface; each kind of run is its own module: objective.py's causal LM, multitask
and task head, preference.py, grpo.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.cache import starts
from peftkit.data.labeled import prepare_labeled_data
from peftkit.data.pipeline import PreparedData, prepare_data
from peftkit.data.preference import prepare_preference_data
from peftkit.recipe.schema import Recipe
from peftkit.training.batches import choose_batching
from peftkit.training.objective import CausalLM, Multitask, Objective, TaskHead
from peftkit.training.preference import Preference, frozen_copy
from peftkit.training.tasks import TaskLosses


def prepare_run_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, seed: int):
    """(prepared data, class names or None) for the recipe's objective and task. Causal-LM and
    task-head data found in or added to the data cache is recorded under the recipe's start key,
    as `peftkit prepare` records it, so that a later `peftkit prepare` of the recipe maps it
    without loading the tokenizer (`peftkit.data.cache.starts`)."""
    if recipe.task.has_head:
        data, names = prepare_labeled_data(recipe.data, recipe.task, tokenizer, seed)
    elif recipe.objective.type == "grpo":
        from peftkit.data.prompts import prepare_prompt_data

        return prepare_prompt_data(
            recipe.data, tokenizer, seed, recipe.objective.reference_column
        ), None
    elif recipe.objective.preference:
        unpaired = recipe.objective.type == "kto"
        return prepare_preference_data(recipe.data, tokenizer, seed, unpaired), None
    else:
        data, names = prepare_data(recipe.data, tokenizer, seed), None
    starts.remember(starts.key_of(recipe), data)
    return data, names


def build_objective(
    recipe: Recipe,
    data: PreparedData,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    precision: str,
    class_names: list[str] | None,
    device: torch.device,
    unwrap: Callable[[nn.Module], nn.Module],
) -> Objective:
    """The run's objective, with its batching chosen for this model (before accelerate wraps it)."""
    batching = choose_batching(
        recipe.train, recipe.adapter, model, recipe.task.has_head, precision, data.train
    )
    pad_id = tokenizer.pad_token_id
    if recipe.task.has_head:
        return TaskHead(pad_id, class_names, recipe.task.type, batching)
    if recipe.objective.type == "grpo":
        return _grpo(recipe, model, tokenizer, unwrap, frozen_copy)
    if recipe.objective.preference:
        spec = recipe.objective
        is_adapter = hasattr(model, "disable_adapter")
        frozen = (
            frozen_copy(model)
            if spec.needs_reference
            and not is_adapter
            and not getattr(spec, "precompute_ref", False)
            else None
        )
        return Preference(spec, pad_id, batching.supervised_only, unwrap, frozen, batching.lengths)
    task_losses = TaskLosses.for_data(data, device)
    if task_losses is not None:
        return Multitask(batching, pad_id, task_losses, recipe.data, data)
    return CausalLM(batching, pad_id)


def _grpo(
    recipe: Recipe,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    unwrap: Callable[[nn.Module], nn.Module],
    frozen_copy: Callable[[nn.Module], nn.Module],
) -> Objective:
    """The GRPO objective: rewards imported, stop ids and the reference chosen."""
    from peftkit.training.grpo import GRPO
    from peftkit.training.rewards import build_rewards

    spec = recipe.objective
    eos = model.generation_config.eos_token_id  # the run's stop ids (set by the loop)
    stop_ids = sorted(eos if isinstance(eos, list) else {eos} - {None})
    frozen = (
        frozen_copy(model) if spec.beta != 0 and not hasattr(model, "disable_adapter") else None
    )
    return GRPO(
        spec,
        build_rewards(spec.rewards, None, tokenizer.chat_template),
        tokenizer,
        stop_ids,
        recipe.train.seed,
        unwrap,
        frozen,
        recipe.eval.max_new_tokens,
    )
