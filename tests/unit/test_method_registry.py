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


@pytest.mark.parametrize(
    "adapter, message",
    [
        ({"peft_type": "hrra"}, "did you mean 'hra'"),
        (
            {"peft_type": "hra", "config": {"rr": 4}},
            "HRAConfig has no such field; did you mean 'r'",
        ),
        ({"peft_type": "hra", "config": {"task_type": "SEQ_CLS"}}, "set by peftkit"),
        ({"peft_type": "vera"}, "use adapter.method: vera"),
        ({"peft_type": "lora"}, "use adapter.method: lora"),
        ({"peft_type": "adalora"}, "use adapter.method: adalora"),
        ({"peft_type": "p_tuning"}, "virtual tokens"),
    ],
)
def test_method_peft_checks_type_and_keys_against_peft(adapter, message):
    raw = {
        "name": "t",
        "model": {"name": "builtin:tiny-llama"},
        "adapter": {"method": "peft", **adapter},
        "data": {"train": "x.jsonl"},
    }
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)
