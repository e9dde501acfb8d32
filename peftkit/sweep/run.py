"""`sweep(recipe, space, trials)`: train the recipe once per trial with values Optuna samples from
the space, prune trials whose eval loss falls behind, and write the table and the best recipe."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import units
from peftkit.errors import SweepError
from peftkit.io import RunLayout
from peftkit.recipe.schema import Recipe
from peftkit.report import compare_runs
from peftkit.sweep.report import (
    TrialRecord,
    format_value,
    trial_records,
    write_best_recipe,
    write_results,
    write_trials,
)
from peftkit.sweep.space import SearchSpace, baseline_params, check_space, load_space
from peftkit.sweep.trial import TrialOutcome, output_to, run_trial

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """Where a sweep wrote its results, and its trials best first."""

    sweep_dir: Path
    trials: list[TrialRecord]
    best: TrialRecord | None
    """The complete trial with the lowest objective (None if no trial completed)."""
    best_recipe: Path | None
    results: Path
    """results.md: the table below, with a header."""
    trials_file: Path
    table: str
    """The markdown table of results.md."""
    study: optuna.Study


def sweep(
    recipe: str | Path,
    space: str | Path,
    trials: int,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    storage: str | Path | None = None,
    enqueue: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> SweepResult:
    """Search the space for the recipe values with the lowest objective, one training per trial.

    Trial i trains into OUT/trial-00i (its printed output goes to OUT/logs/trial-00i.log); after
    each trial OUT/trials.jsonl, OUT/results.md and OUT/best_recipe.yaml are rewritten, so an
    interrupted sweep keeps what it finished. A trial that fails with a `PeftkitError` (a NaN
    loss at a high lr, values that do not go together) is recorded as failed and the sweep goes
    on; Ctrl-C stops the sweep after recording the trial it interrupted.

    Args:
        recipe: the recipe file every trial starts from.
        space: SPACE.yaml (see `peftkit.sweep.space`).
        trials: how many trials the sweep has in total (with `storage`, trials of an earlier
            run of the same sweep count, so rerunning the command continues it).
        overrides: dotted overrides applied to the recipe in every trial (`train.max_steps=200`).
        out_dir: the sweep folder; default: the recipe's output.dir + "-sweep".
        storage: an sqlite file (or Optuna storage URL) holding the study, to continue it later;
            default: in memory.
        enqueue: params of trials to run first (after the baseline), e.g. [{"train.lr": 1e-4}].
        overwrite: replace a sweep folder that holds results of another sweep.
    """
    if trials < 1:
        raise SweepError(f"trials must be at least 1 (got {trials})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError(
            "a sweep runs its trials one after another in one process: "
            "start it with plain python or `peftkit sweep`, not accelerate launch / torchrun"
        )
    optuna = _import_optuna()
    recipe_path, space_path = Path(recipe), Path(space)
    overrides = list(overrides or [])
    spec = load_space(space_path)
    base = check_space(spec, recipe_path, overrides, source=str(space_path))
    sweep_dir = Path(out_dir) if out_dir is not None else Path(base.run_dir + "-sweep")

    study = _open_study(optuna, spec, sweep_dir, storage, overwrite)
    if not study.trials:
        _enqueue_first_trials(study, spec, base, enqueue or [])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    title = f"{recipe_path} over {space_path}" + (
        f" with {' '.join(overrides)}" if overrides else ""
    )

    # Trials cut short by Ctrl-C (or by a killed process: still RUNNING) are not part of the count.
    done = sum(
        t.state.is_finished() and t.user_attrs.get("state") != "interrupted" for t in study.trials
    )
    for i in range(done + 1, trials + 1):
        with warnings.catch_warnings():
            # An enqueued baseline outside [low, high] is the usual case: the sweep is there to
            # leave it. Optuna runs it as given but warns.
            warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range")
            trial = study.ask(spec.distributions())
        name = f"trial-{trial.number:03d}"
        with output_to(sweep_dir / "logs" / f"{name}.log"):
            outcome = run_trial(trial, recipe_path, overrides, sweep_dir / name, spec.objective)
        _tell(study, trial, outcome, sweep_dir / name)
        result = _write_outputs(study, spec, sweep_dir, recipe_path, overrides, title)
        log.info(_trial_line(trial, outcome, i, trials, spec.objective))
        if outcome.state == "interrupted":
            again = " Run the same command to continue the sweep." if storage else ""
            raise SweepError(
                f"interrupted during trial {trial.number}; the finished trials are in "
                f"{result.results}.{again}"
            )
    return _write_outputs(study, spec, sweep_dir, recipe_path, overrides, title)


def _import_optuna():
    try:
        import optuna
    except ImportError as e:
        raise SweepError("peftkit sweep needs optuna: pip install 'peftkit[sweep]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
    return optuna


def _open_study(
    optuna, spec: SearchSpace, sweep_dir: Path, storage: str | Path | None, overwrite: bool
) -> optuna.Study:
    url = None
    if storage is not None:
        url = str(storage) if "://" in str(storage) else f"sqlite:///{Path(storage).resolve()}"
    study = optuna.create_study(
        storage=url,
        study_name=sweep_dir.name,
        direction="minimize",
        pruner=spec.pruner.build(),
        load_if_exists=True,
    )
    if not study.trials and sweep_dir.exists() and any(sweep_dir.iterdir()):
        if not overwrite:
            raise SweepError(
                f"sweep folder {sweep_dir} already holds results; choose another out_dir, "
                "pass overwrite to replace it, or the storage of that sweep to continue it"
            )
        shutil.rmtree(sweep_dir)
    # A continued sweep reseeds past its trials, so it does not redraw the values it already ran.
    study.sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.trials))
    return study


def _enqueue_first_trials(
    study: optuna.Study, spec: SearchSpace, base: Recipe, enqueue: list[dict[str, Any]]
) -> None:
    if spec.baseline:
        study.enqueue_trial(baseline_params(spec, base), user_attrs={"baseline": True})
    for params in enqueue:
        unknown = sorted(set(params) - set(spec.params))
        if unknown:
            raise SweepError(f"enqueue: {', '.join(unknown)} not in the space's params")
        study.enqueue_trial(params)


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, run_dir: Path) -> None:
    from optuna.trial import TrialState

    attrs = {
        "state": outcome.state,
        "best_eval_loss": outcome.best_eval_loss,
        "steps": outcome.steps,
        "seconds": outcome.seconds,
        "run_dir": str(run_dir),
        "error": outcome.error,
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if outcome.state == "complete":
        study.tell(trial, outcome.value)
    else:
        state = TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL
        study.tell(trial, state=state)


def _write_outputs(
    study: optuna.Study,
    spec: SearchSpace,
    sweep_dir: Path,
    recipe_path: Path,
    overrides: list[str],
    title: str,
) -> SweepResult:
    records = trial_records(study)
    best = next((r for r in records if r.state == "complete"), None)
    best_recipe = sweep_dir / "best_recipe.yaml" if best else None
    if best is not None:
        write_best_recipe(best_recipe, recipe_path, overrides, best, spec.objective)
    write_trials(sweep_dir / "trials.jsonl", records)
    table = write_results(sweep_dir / "results.md", records, spec.objective, title, best_recipe)
    runs = [r.run_dir for r in records if r.run_dir and RunLayout(r.run_dir).recipe.is_file()]
    if runs:  # the trials side by side, best first: report.html
        compare_runs(runs, sweep_dir / "report.html")
    return SweepResult(
        sweep_dir=sweep_dir,
        trials=records,
        best=best,
        best_recipe=best_recipe,
        results=sweep_dir / "results.md",
        trials_file=sweep_dir / "trials.jsonl",
        table=table,
        study=study,
    )


def _trial_line(
    trial: optuna.Trial, outcome: TrialOutcome, i: int, total: int, objective: str
) -> str:
    params = " ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
    if outcome.state == "complete":
        result = f"{objective} {outcome.value:.4f}"
    else:
        result = (outcome.error or "").splitlines()[0][:160]
    return (
        f"trial {trial.number} ({i}/{total}) {outcome.state}: {result} | {params} | "
        f"{outcome.steps} steps, {units.duration(outcome.seconds)}"
    )
