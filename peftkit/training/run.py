"""Train one validated recipe: setup -> train -> finish (what `peftkit train` and each sweep trial run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peftkit.recipe.schema import Recipe
from peftkit.training import trackers
from peftkit.training.callbacks import Callback, CallbackFactory
from peftkit.training.loop import FineTuneRun, ReportWriter, StepCallback


def train(
    recipe: Recipe,
    resume: bool = False,
    on_step: StepCallback | None = None,
    refresh_report: ReportWriter | None = None,
    callbacks: Sequence[Callback | CallbackFactory] = (),
) -> dict[str, Any]:
    """Fine-tune as `recipe` says; returns the run summary (also written to RUN_DIR/summary.json).

    `refresh_report(run_dir)` rewrites the run's report page after each evaluation and at the end
    (api.train and the sweep hand in `peftkit.report.refresh_run_report`); `callbacks` run after
    the recipe's own (training/callbacks.py)."""
    run = FineTuneRun(recipe, resume, on_step, refresh_report, callbacks)
    run.setup()
    try:
        run.train()
        return run.finish()
    finally:
        trackers.finish(run.accelerator)
