"""Recipe parsing: every shipped recipe validates, overrides work, errors name the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.errors import RecipeError
from peftkit.methods import method_names
from peftkit.recipe.load import load_recipe, validate_recipe
from peftkit.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
BASE = {"model": {"name": "m"}, "adapter": {"method": "lora"}, "data": {"train": "d.jsonl"}}


def test_recipes_exist_for_the_main_methods():
    methods = {load_recipe(p).adapter.method for p in RECIPES}
    assert {"lora", "qlora", "full", "partial", "ia3", "prompt_tuning"} <= methods


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates_and_says_how_to_run_it(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# peftkit train recipes/")
    assert first.split()[-1] == str(path.relative_to(ROOT))  # the command runs from the repo root


def test_dotted_overrides_are_typed_and_applied(tmp_path):
    path = RECIPES[0]
    recipe = load_recipe(
        path,
        [
            "train.lr=1e-4",
            "adapter.method=lora",
            "adapter.r=4",
            "data.max_length=64",
            "train.early_stopping={patience: 2}",
        ],
    )
    assert recipe.train.lr == 1e-4 and recipe.adapter.r == 4 and recipe.data.max_length == 64
    assert recipe.train.early_stopping.patience == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"lrr": 1}}, r"train\.lrr: unknown key\. Did you mean 'train\.lr'"),
        (
            {"adapter": {"method": "lora", "rank": 8}},
            r"adapter\.rank: unknown key\. Did you mean 'adapter\.r'",
        ),
        ({"train": {"learning_rate": 1e-4}}, r"Did you mean 'train\.lr'"),
        ({"modle": {}}, r"modle: unknown key\. Did you mean 'model'"),
        (
            {"data": {"train": [{"path": "x", "fromat": "text"}]}},
            r"data\.train\.0\.fromat: unknown key\. Did you mean 'data\.train\.0\.format'",
        ),
        (
            {"train": {"micro_batch_size": 0}},
            r"train\.micro_batch_size: Input should be greater than 0",
        ),
        ({"adapter": {"method": "qlora"}}, r"needs a quantized base"),
        (
            {"adapter": {"method": "full"}, "model": {"name": "m", "quantization": {"bits": 4}}},
            r"cannot be quantized",
        ),
        (
            {
                "adapter": {"method": "lora", "init": "pissa"},
                "model": {"name": "m", "quantization": {"bits": 4}},
            },
            r"cannot run on a quantized base",
        ),
        ({"train": {"early_stopping": {"patience": 2}}}, r"early_stopping needs eval data"),
        (
            {"adapter": {"method": "partial", "top_layers": 0}},
            r"needs top_layers > 0 or at least one pattern",
        ),
        (
            {"adapter": {"method": "prefix_tuning"}, "train": {"gradient_checkpointing": True}},
            r"gradient checkpointing",
        ),
        (
            {"adapter": {"method": "prompt_tuning"}, "train": {"packing": True}},
            r"virtual tokens, so rows cannot be packed",
        ),
        (
            {"train": {"packing": False, "micro_batch_tokens": 1024}},
            r"train\.micro_batch_tokens cuts packed micro-batches, but train\.packing is false",
        ),
        (
            {"adapter": {"method": "prompt_tuning"}, "train": {"micro_batch_tokens": 1024}},
            r"micro_batch_tokens .* \(virtual tokens\) does not pack rows",
        ),
        (
            {"objective": "dpo", "train": {"micro_batch_tokens": 1024}},
            r"micro_batch_tokens .* objective dpo scores each answer as its own sequence",
        ),
    ],
)
def test_invalid_recipes_name_the_field_and_what_to_do(change, message):
    raw = {**BASE, **change}
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)


def test_every_registered_method_has_a_recipe_section():
    quantized = {"name": "m", "quantization": {"bits": 4}}
    required = {"peft": {"peft_type": "hra"}}  # the one method with a key that has no default
    for name in method_names():
        raw = {
            **BASE,
            "adapter": {"method": name, **required.get(name, {})},
            **({"model": quantized} if name == "qlora" else {}),
            **({"task": {"type": "classification"}} if name == "linear_probe" else {}),
        }
        assert validate_recipe(raw).adapter.method == name


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="not of the form"):
        load_recipe(RECIPES[0], ["train.lr"])


def test_validate_prints_the_resolved_recipe_and_notes(capsys):
    import yaml

    from peftkit.cli import main

    path = next(p for p in RECIPES if p.name == "quickstart.yaml")
    assert main(["validate", str(path), "train.precision=fp16", "adapter.r=4"]) == 0
    out, err = capsys.readouterr()
    resolved = yaml.safe_load(out)
    assert resolved["adapter"]["r"] == 4 and resolved["train"]["warmup_ratio"] == 0.03
    assert resolved["data"]["train"][0]["path"].endswith("recipes/data/orders-train.jsonl")
    assert resolved["eval"]["metric"] == "json_fields"
    assert "fp16 needs a GPU" in err and "is valid" in err
    assert main(["validate", str(path), "train.lr=-1"]) == 2
    assert "train.lr: Input should be greater than 0" in capsys.readouterr().err


MINIMAL = "model:\n  name: m\n  {switch}\nadapter:\n  method: lora\ndata:\n  train: d.jsonl\n"


@pytest.mark.parametrize("value", ["'yes'", "yes", "on", "On", "'true'", "1", "y"])
@pytest.mark.parametrize(
    ("section", "key"), [("model", "trust_remote_code"), ("output", "overwrite")]
)
def test_security_switches_take_real_booleans_only(tmp_path, section, key, value):
    path = tmp_path / "r.yaml"
    text = MINIMAL.format(switch="") + f"{section}:\n  {key}: {value}\n"
    if section == "model":
        text = MINIMAL.format(switch=f"{key}: {value}")
    path.write_text(text)
    with pytest.raises(RecipeError, match=rf"{section}\.{key}: Input should be a valid boolean"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=rf"{section}\.{key}: Input should be a valid boolean"):
        load_recipe(tmp_path / "r.yaml", [f"{section}.{key}={value}"])


def test_security_switches_accept_true_and_false(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.format(switch="trust_remote_code: true"))
    assert load_recipe(path).model.trust_remote_code is True
    assert load_recipe(path, ["model.trust_remote_code=false"]).model.trust_remote_code is False


def test_yaml_1_1_booleans_stay_strings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.format(switch="") + "name: on\n")
    assert load_recipe(path).name == "on"


def test_duplicate_keys_are_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.format(switch="") + "train:\n  lr: 1e-4\n  epochs: 2\n  lr: 1e-3\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: .*'lr' is given twice .*lines 9 and 11"):
        load_recipe(path)
