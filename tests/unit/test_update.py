"""The DeepSpeed config is filled from the recipe (one source for batch size, accumulation and
clipping), and a launch config that says otherwise is refused naming both."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peftkit.errors import RecipeError
from peftkit.recipe.schema import TrainSpec
from peftkit.training.update import configure_deepspeed


def _accelerator(config: dict) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)


def test_deepspeed_config_comes_from_the_recipe():
    config = {"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}
    configure_deepspeed(
        _accelerator(config), TrainSpec(micro_batch_size=3, grad_accum=4, max_grad_norm=None)
    )
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 2
    assert config["gradient_clipping"] == 0.0  # no clipping


def test_a_launch_config_that_disagrees_with_the_recipe_is_refused():
    with pytest.raises(RecipeError, match=r"gradient_clipping: 1\.0.*train\.max_grad_norm"):
        configure_deepspeed(_accelerator({"gradient_clipping": 1.0}), TrainSpec(max_grad_norm=0.5))
