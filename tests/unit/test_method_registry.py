"""The registry's capability declarations are consistent, and the recipe's rules follow them."""

from __future__ import annotations

import pytest

from peftkit.errors import RecipeError
from peftkit.methods import registered_methods
from peftkit.recipe.load import validate_recipe

SPECS = registered_methods()


@pytest.mark.parametrize("name", list(SPECS))
def test_capabilities_are_consistent(name):
    spec = SPECS[name]
    assert spec.quantized_variant is None or spec.quantized_variant in SPECS
    assert not (spec.full_weights and spec.mergeable), "a whole model has no adapter to merge"
    assert spec.causal_lm or spec.task_heads, f"{name} can train nothing"
    if spec.virtual_tokens:  # peft's soft prompts have no sequence-classification form here
        assert not spec.task_heads


def test_the_head_rule_names_the_methods_that_train_heads():
    raw = {
        "name": "t",
        "model": {"name": "builtin:tiny-llama"},
        "adapter": {"method": "prompt_tuning"},
        "task": {"type": "classification"},
        "data": {"train": "x.jsonl"},
    }
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw)
    able = [n for n, spec in SPECS.items() if spec.task_heads]
    assert "cannot train a task.type 'classification' head: use one of " + ", ".join(able) in str(
        e.value
    )
