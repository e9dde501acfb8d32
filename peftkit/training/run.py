"""Train one validated recipe: setup -> train -> finish (what `peftkit train` and each sweep trial run)."""

from __future__ import annotations

from typing import Any

from peftkit.recipe.schema import Recipe
from peftkit.training.loop import FineTuneRun, StepCallback


def train(
    recipe: Recipe, resume: bool = False, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Fine-tune as `recipe` says; returns the run summary (also written to RUN_DIR/summary.json)."""
    run = FineTuneRun(recipe, resume=resume, on_step=on_step)
    run.setup()
    run.train()
    return run.finish()
