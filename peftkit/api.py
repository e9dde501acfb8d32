"""The public Python surface: each CLI verb is one function here, usable from a notebook too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from peftkit.recipe.load import load_recipe
from peftkit.recipe.schema import Recipe
from peftkit.training.loop import FineTuneRun, StepCallback


def validate(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe (raises `RecipeError` naming every problem). Loads no model."""
    return load_recipe(recipe, overrides)


def environment_notes(recipe: Recipe) -> list[str]:
    """What this machine makes of the recipe (precision, missing packages, missing files)."""
    import importlib.util

    import torch

    from peftkit.errors import RecipeError
    from peftkit.training.precision import resolve_precision

    notes = []
    try:
        precision = resolve_precision(recipe.train, torch.cuda.is_available())
        notes.append(f"train.precision resolves to {precision} on this machine")
    except RecipeError as e:
        notes.append(f"cannot train here as written: {e}")
    needs_bnb = recipe.model.quantization is not None or recipe.train.optimizer != "adamw"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        notes.append(
            "bitsandbytes is not installed but the recipe needs it (quantization / 8-bit optimizer)"
        )
    for source in [*recipe.data.train, *recipe.data.eval]:
        if (
            source.path.lower().endswith((".jsonl", ".json", ".csv", ".parquet"))
            and not Path(source.path).exists()
        ):
            notes.append(f"data file not found: {source.path}")
    return notes


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def train(
    recipe: str | Path | Recipe,
    overrides: list[str] | None = None,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Fine-tune as the recipe says; returns the run summary (also written to RUN_DIR/summary.json).

    Args:
        recipe: a recipe file or an already validated `Recipe`.
        overrides: dotted `section.key=value` overrides applied to a recipe file.
        resume: continue the run in the recipe's output.dir from its last checkpoint.
        on_step: called as on_step(step, metrics) after each optimizer step (main and other processes).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    run = FineTuneRun(recipe, resume=resume, on_step=on_step)
    run.setup()
    run.train()
    return run.finish()


def plan(
    recipe: str | Path | Recipe, overrides: list[str] | None = None, gpu_memory: str | None = None
):
    """Predict peak training memory of a recipe (loads no weights); see `peftkit.planner.plan`.

    Args:
        gpu_memory: plan for a GPU of this size ("24GB"); default: this machine.
    """
    from peftkit.planner.plan import make_plan, parse_size

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return make_plan(recipe, parse_size(gpu_memory) if gpu_memory else None)


def export(path: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Export a run to deployable weights (see `peftkit.export.run.export` for the options)."""
    from peftkit.export.run import export as run_export

    return run_export(path, out, **options)
