"""One trial of a sweep: train the recipe with the trial's values, report each evaluation to
Optuna, and stop the run at a step boundary when the pruner says so."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftkit.errors import PeftkitError
from peftkit.recipe.load import load_recipe
from peftkit.report import refresh_run_report
from peftkit.sweep.space import override
from peftkit.training.run import train

if TYPE_CHECKING:
    import optuna

State = Literal["complete", "pruned", "failed", "interrupted"]


@dataclass
class TrialOutcome:
    """What one trial did; `value` is the objective (None unless complete)."""

    state: State
    value: float | None = None
    best_eval_loss: float | None = None
    steps: int = 0
    seconds: float = 0.0
    error: str | None = None
    eval_losses: dict[int, float] = field(default_factory=dict)


def run_trial(
    trial: optuna.Trial,
    recipe_path: Path,
    overrides: list[str],
    run_dir: Path,
    objective: str,
) -> TrialOutcome:
    """Train with the trial's params into `run_dir`; never raises for a `PeftkitError`.

    A pruned run stops right after the evaluation that condemned it, at a step boundary, so its
    folder holds whole files only (recipe, metrics, any checkpoints and best/), like a run that
    was stopped, but no summary or final adapter.
    """
    from optuna import TrialPruned

    outcome = TrialOutcome(state="failed")
    started = time.perf_counter()
    try:
        trial_overrides = [override(k, v) for k, v in trial.params.items()]
        recipe = load_recipe(
            recipe_path, [*overrides, *trial_overrides, override("output.dir", str(run_dir))]
        )

        def on_step(step: int, metrics: dict[str, Any]) -> None:
            # on_step carries the eval loss of the steps that evaluated (never step 0: the
            # untrained model is the same in every trial and says nothing)
            outcome.steps = step
            if "eval_loss" in metrics:
                loss = metrics["eval_loss"]
                outcome.eval_losses[step] = loss
                trial.report(loss, step)
                if trial.should_prune():
                    raise TrialPruned(
                        f"eval loss {loss:.4f} at step {step}, worse than earlier trials"
                    )

        summary = train(recipe, on_step=on_step, refresh_report=refresh_run_report)
        outcome.steps = summary["steps"]
        outcome.value = summary[objective]
        if outcome.value is None or not math.isfinite(outcome.value):
            outcome.error = f"the run summary has no finite {objective}"
        else:
            outcome.state = "complete"
        outcome.best_eval_loss = summary["best_eval_loss"]
    except TrialPruned as e:
        outcome.state, outcome.error = "pruned", str(e)
    except PeftkitError as e:
        # The loop turns Ctrl-C / SIGTERM into TrainingStopped; the interrupt stays its context.
        interrupted = isinstance(e.__context__, KeyboardInterrupt)
        outcome.state = "interrupted" if interrupted else "failed"
        outcome.error = f"interrupted at step {outcome.steps}" if interrupted else str(e)
    except KeyboardInterrupt:
        outcome.state, outcome.error = "interrupted", "interrupted before training started"
    finally:
        outcome.seconds = round(time.perf_counter() - started, 2)
        _release_memory()  # the stopped run's model lived in the exception's frames
    if outcome.best_eval_loss is None and outcome.eval_losses:
        outcome.best_eval_loss = min(outcome.eval_losses.values())
    return outcome


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def output_to(path: Path):
    """Send a trial's training log (data audit, evaluations, run summary) to a file, not the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("peftkit.training")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
