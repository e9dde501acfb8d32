"""`peftkit prepare` works on every shipped recipe whose model loads offline: SFT, task-head,
preference and reward (GRPO) recipes alike, and keeps every objective's rows that it caches (all but
GRPO's) in the data cache. Recipes naming a hub model (they need the network)
are checked by `peftkit validate` in tests/unit/test_recipes.py instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftkit.cli import main
from peftkit.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(
    p
    for p in (ROOT / "recipes").rglob("*.yaml")
    if p.parent.name not in ("accelerate", "sweep")
    and str(yaml.safe_load(p.read_text())["model"]["name"]).startswith("builtin:")
)


def test_the_offline_recipes_cover_every_kind_of_objective():
    kinds = [yaml.safe_load(p.read_text()).get("objective", "sft") for p in RECIPES]
    types = {k if isinstance(k, str) else k["type"] for k in kinds}
    assert {"sft", "dpo", "orpo", "grpo"} <= types, types


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_prepare_runs_on_every_offline_recipe(recipe, capsys):
    if recipe.name == "pretrain.yaml":
        pytest.skip("its corpus is generated (recipes/data/make_quickstart.py --pretrain-corpus)")
    assert main(["prepare", str(recipe)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "kept of" in out and ("encoded data:" in out or "encoded and checked" in out)
    if load_recipe(recipe).objective_kind.caches_rows:  # preference data too, as SFT data
        assert "encoded data:" in out, out


def test_the_tools_recipe_refuses_smollm2s_own_template_naming_the_remedy(capsys):
    # SmolLM2's template ignores tools: with it the tool rows are refused, not silently dropped.
    recipe = ROOT / "recipes" / "smollm2-135m" / "tools.yaml"
    assert main(["prepare", str(recipe), "data.chat_template=auto"]) != 0
    err = capsys.readouterr().err
    assert "tools-train.jsonl line 1: the chat template ignores the tools list" in err
    assert "data.chat_template: fallback" in err
