"""Layer groups (top to bottom), the unfreezing schedule as a pure function of the step, per-group
lr factors, and the recipe errors of the layer-wise options."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import RecipeError
from peftkit.models.layer_groups import layer_groups
from peftkit.recipe.load import validate_recipe
from peftkit.training.unfreeze import LayerSchedule

BASE = {"model": {"name": "m"}, "data": {"train": "d.jsonl"}}


def _llama(tied: bool, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_groups_run_from_the_head_down_to_the_embeddings():
    groups = layer_groups(_llama(tied=False))
    assert [g.label for g in groups] == ["head", "layer 2", "layer 1", "layer 0", "embeddings"]
    assert groups[0].names == ["model.norm.weight", "lm_head.weight"]
    assert groups[-1].names == ["model.embed_tokens.weight"]
    assert all(n.startswith("model.layers.2.") for n in groups[1].names)
    assert sum(len(g.names) for g in groups) == len(list(_llama(tied=False).named_parameters()))


def test_a_tied_embedding_is_one_parameter_in_the_head_group():
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = layer_groups(model)
    assert [g.label for g in groups] == ["head", "layer 2", "layer 1", "layer 0"]
    assert "model.embed_tokens.weight" in groups[0].names  # named once, trained with the head


def test_a_selection_keeps_only_its_groups_numbered_from_the_top():
    model = _llama(tied=False)
    only = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.layers.1.", "model.layers.2."))
    }
    assert [g.label for g in layer_groups(model, only)] == ["layer 2", "layer 1"]


def test_the_schedule_is_a_pure_function_of_the_step():
    model = _llama(tied=False)
    schedule = LayerSchedule(layer_groups(model), decay=0.5, every=3, per_stage=2, start=1)
    assert [schedule.groups_at(s) for s in range(10)] == [1, 1, 1, 3, 3, 3, 5, 5, 5, 5]
    assert [schedule.unfrozen_after(g, 100) for g in range(5)] == [0, 3, 3, 6, 6]
    assert schedule.unfrozen_after(4, 6) is None  # the run ends first
    # Jumping straight to a step (as a resume does) gives the same state as walking there.
    assert schedule.set_step(4) == []
    trainable = [all(p.requires_grad for p in g.params) for g in schedule.groups]
    frozen = [not any(p.requires_grad for p in g.params) for g in schedule.groups]
    assert trainable == [True, True, True, False, False] and frozen[3:] == [True, True]
    assert schedule.set_step(6) == ["layer 0", "embeddings"]  # the boundary that unfroze them
    scales = schedule.lr_scales()
    assert scales["lm_head.weight"] == 1.0 and scales["model.layers.2.mlp.up_proj.weight"] == 0.5
    assert scales["model.embed_tokens.weight"] == 0.5**4


def test_several_processes_are_refused_with_unfreezing_only():
    full = validate_recipe({**BASE, "adapter": {"method": "full", "unfreeze": {"every_steps": 2}}})
    with pytest.raises(RecipeError, match=r"adapter\.unfreeze cannot run on 2 processes"):
        LayerSchedule.for_run(full.adapter, _llama(tied=False), 10, processes=2)
    decay = validate_recipe({**BASE, "adapter": {"method": "full", "layer_lr_decay": 0.9}})
    assert LayerSchedule.for_run(decay.adapter, _llama(tied=False), 10, processes=2).enabled


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (
            {"method": "lora", "unfreeze": {"every_steps": 2}},
            r"adapter\.unfreeze applies to whole-model methods only \(full, partial\), not 'lora'",
        ),
        (
            {"method": "ia3", "layer_lr_decay": 0.9},
            r"adapter\.layer_lr_decay applies to whole-model methods only",
        ),
        (
            {"method": "full", "layer_lr_decay": 0},
            r"adapter\.layer_lr_decay: Input should be greater than 0",
        ),
        (
            {"method": "partial", "layer_lr_decay": 1.5},
            r"adapter\.layer_lr_decay: Input should be less than or equal to 1",
        ),
        (
            {"method": "full", "unfreeze": {"every_steps": 2, "every_epochs": 1}},
            r"adapter\.unfreeze.*exactly one of every_steps and every_epochs",
        ),
        ({"method": "full", "unfreeze": {}}, r"adapter\.unfreeze.*exactly one of every_steps"),
        (
            {"method": "full", "unfreeze": {"every_steps": 0}},
            r"adapter\.unfreeze\.every_steps: Input should be greater than 0",
        ),
        (
            {"method": "full", "unfreeze": {"every_step": 2}},
            r"Did you mean 'adapter\.unfreeze\.every_steps'",
        ),
    ],
)
def test_bad_layerwise_options_name_the_key(adapter, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe({**BASE, "adapter": adapter})


def test_the_planner_counts_every_weight_that_will_ever_train():
    """apply() leaves the whole selection trainable (freezing is the loop's, per step), so the
    planner's trainable count is the peak, reached once everything is unfrozen."""
    recipe = validate_recipe(
        {**BASE, "adapter": {"method": "partial", "top_layers": 2, "unfreeze": {"every_steps": 1}}}
    )
    model = recipe.adapter.apply(_llama(tied=False), ctx=_ctx())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.layers.1.", "model.layers.2."))
    }


def _ctx():
    from pathlib import Path

    from peftkit.methods.base import ApplyContext

    return ApplyContext(None, "", False, False, Path("."))
