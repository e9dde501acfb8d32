"""Train one validated recipe: setup -> train -> finish (what `peftkit train` and each sweep trial run)."""

from __future__ import annotations

from typing import Any

from peftkit.recipe.schema import Recipe
from peftkit.training import trackers
from peftkit.training.loop import FineTuneRun, ReportWriter, StepCallback


def train(
    recipe: Recipe,
    resume: bool = False,
    on_step: StepCallback | None = None,
    refresh_report: ReportWriter | None = None,
) -> dict[str, Any]:
    """Fine-tune as `recipe` says; returns the run summary (also written to RUN_DIR/summary.json).

    `refresh_report(run_dir)` rewrites the run's report page after each evaluation and at the end
    (api.train and the sweep hand in `peftkit.report.refresh_run_report`)."""
    run = FineTuneRun(recipe, resume=resume, on_step=on_step, refresh_report=refresh_report)
    run.setup()
    try:
        run.train()
        return run.finish()
    finally:
        trackers.finish(run.accelerator)
