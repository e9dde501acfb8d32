"""The search space file: validated on its own, then every key and range end against the recipe,
before any trial runs. Loads no model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.errors import SweepError
from peftkit.recipe.load import load_recipe
from peftkit.sweep import load_space, sweep
from peftkit.sweep.space import baseline_params, check_space, override

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SPACES = sorted(RECIPES.rglob("*.yml"))  # search spaces are .yml: recipes are .yaml
BASE = {
    "model": {"name": "m"},
    "adapter": {"method": "lora", "r": 8},
    "data": {"train": "d.jsonl", "eval": "e.jsonl"},
    "train": {"eval_every": 5, "lr": 1e-3},
    "output": {"dir": "runs/x"},
}
LR = {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}


def _files(tmp_path: Path, space: dict[str, Any], **recipe: Any) -> tuple[Path, Path]:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**BASE, **recipe}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return tmp_path / "recipe.yaml", tmp_path / "space.yaml"


def test_an_unknown_recipe_key_fails_naming_it_before_any_trial(tmp_path):
    recipe, space = _files(tmp_path, {"params": {"train.learning_rate": LR}})
    with pytest.raises(SweepError) as e:
        sweep(recipe, space, trials=3, out_dir=tmp_path / "sweep")
    assert "params.train.learning_rate" in str(e.value)
    assert "Did you mean 'train.lr'" in str(e.value)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"adapter.r": {"type": "categorical", "choices": [4, "many"]}}, r"adapter\.r = 'many'"),
        ({"train.lr": {**LR, "high": 1e9, "low": -1.0}}, r"log needs low > 0"),
        ({"train.lr": {**LR, "low": 1e-2, "high": 1e-5}}, r"must be below high"),
        (
            {"train.lr": {**LR, "logg": True}},
            r"params\.train\.lr\.logg: unknown key\. Did you mean 'log'",
        ),
        ({"train.lr": {"type": "loguniform"}}, r"does not match any of the expected tags"),
        (
            {"output.dir": {"type": "categorical", "choices": ["a"]}},
            r"sets each trial's output\.dir",
        ),
        (
            {"adapter.r": {"type": "categorical", "choices": [4, 16]}},
            r"recipe's adapter\.r = 8 is not among",
        ),
    ],
)
def test_invalid_spaces_say_what_to_change(tmp_path, params, message):
    recipe, space = _files(tmp_path, {"params": params})
    with pytest.raises(SweepError, match=message):
        check_space(load_space(space), recipe, [])


def test_pruning_needs_evaluations_and_eval_objectives_need_eval_data(tmp_path):
    recipe, space = _files(tmp_path, {"params": {"train.lr": LR}}, train={"lr": 1e-3})
    with pytest.raises(SweepError, match=r"set train\.eval_every in the recipe"):
        check_space(load_space(space), recipe, [])
    assert check_space(load_space(space), recipe, ["train.eval_every=10"]).train.eval_every == 10
    no_eval = {**BASE["data"], "eval": []}
    recipe, space = _files(
        tmp_path, {"params": {"train.lr": LR}, "pruner": "none"}, data=no_eval, train={}
    )
    with pytest.raises(SweepError, match="objective best_eval_loss needs eval data"):
        check_space(load_space(space), recipe, [])


def test_overrides_read_back_as_the_sampled_value(tmp_path):
    recipe, _ = _files(tmp_path, {})
    for key, value in [
        ("train.lr", 1e-7),
        ("adapter.r", 16),
        ("data.system_prompt", "Answer: briefly"),  # YAML would read `a: b` as a mapping
        ("data.system_prompt", "no"),  # and `no` as False
    ]:
        loaded = load_recipe(recipe, [override(key, value)])
        section, field = key.split(".")
        assert getattr(getattr(loaded, section), field) == value


@pytest.mark.parametrize("path", SPACES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_space_fits_the_recipe_its_command_names(path):
    command = path.read_text().splitlines()[0].split()  # # peftkit sweep RECIPE --space SPACE ...
    assert command[:3] == ["#", "peftkit", "sweep"] and command[4] == "--space"
    assert command[5] == str(path.relative_to(RECIPES.parent))
    space = load_space(path)
    recipe = check_space(space, RECIPES.parent / command[3], [])
    assert baseline_params(space, recipe).keys() == space.params.keys()


def test_spaces_are_shipped():
    assert SPACES, "recipes/**/*.yml: no search space found"
