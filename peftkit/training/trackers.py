"""Experiment trackers (`output.report_to`) through accelerate's tracker integration: the recipe as
hyper-parameters, then every record metrics.jsonl gets, at its step, from the main process only.

Nothing leaves the machine by default: TensorBoard writes RUN/tensorboard/, W&B runs offline
into RUN/wandb/ unless WANDB_MODE says otherwise, MLflow writes a file store in RUN/mlruns/ unless
MLFLOW_TRACKING_URI points elsewhere, trackio keeps its local database. A resumed run
appends to the same W&B / MLflow / trackio run (their ids are kept in RUN/trackers.json) and
TensorBoard's folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from peftkit import _compat
from peftkit.errors import RecipeError
from peftkit.io import RunLayout, atomic_write_json
from peftkit.recipe.load import flatten

PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
}
"""Tracker name -> the module it needs (and the peftkit extra that installs it, of the same name)."""


def accelerator_kwargs(report_to: Sequence[str], run: RunLayout) -> dict[str, Any]:
    """Accelerator(...) arguments for the trackers; raises RecipeError naming a missing package."""
    if not report_to:
        return {}
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise RecipeError(
                f"output.report_to: {name} is not installed; install it with "
                f"pip install 'peftkit[{name}]'"
            )
    return {
        "log_with": list(report_to),
        "project_config": ProjectConfiguration(
            project_dir=str(run.path), logging_dir=str(run.path / "tensorboard")
        ),
    }


def _hyperparameters(recipe_dump: dict[str, Any]) -> dict[str, Any]:
    """The recipe as dotted keys (`train.lr`) with values every tracker accepts."""
    return {key: _scalar(value) for key, value in flatten(recipe_dump).items()}


def _scalar(value: Any) -> bool | int | float | str:
    if value is None:
        return "none"
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def start(
    accelerator: Accelerator,
    report_to: Sequence[str],
    run: RunLayout,
    name: str,
    recipe_dump: dict[str, Any],
) -> None:
    """Open the trackers' runs (main process only), continuing those of RUN/trackers.json."""
    if not report_to or not accelerator.is_main_process:
        return
    ids = json.loads(run.trackers.read_text()) if run.trackers.is_file() else {}
    init: dict[str, dict[str, Any]] = {}
    if "wandb" in report_to:
        init["wandb"] = {
            "dir": str(run.path),
            "name": name,
            "resume": "allow",
            "id": ids.get("wandb"),
        }
        if "WANDB_MODE" not in os.environ:
            init["wandb"]["mode"] = "offline"
    if "mlflow" in report_to:
        import mlflow

        init["mlflow"] = {"run_name": name, "run_id": ids.get("mlflow")}
        if "MLFLOW_TRACKING_URI" not in os.environ:
            _compat.allow_mlflow_file_store()
            mlflow.set_tracking_uri((run.path / "mlruns").resolve().as_uri())
    if "trackio" in report_to:
        init["trackio"] = {"name": ids.get("trackio") or name, "resume": "allow"}
    accelerator.init_trackers(name, init_kwargs=init)
    config = _hyperparameters(recipe_dump)
    for tracker in accelerator.trackers:
        # a resume records its recipe changes, except in MLflow: a run's params never change
        if not (tracker.name == "mlflow" and "mlflow" in ids):
            tracker.store_init_configuration(config)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "trackio":
            ids["trackio"] = init["trackio"]["name"]
    if ids:
        atomic_write_json(run.trackers, ids)


def log(accelerator: Accelerator, record: dict[str, Any]) -> None:
    """One metrics.jsonl record, at its step: its numbers (step itself and lists left out)."""
    values = {
        k: v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if values and accelerator.trackers:
        accelerator.log(values, step=record["step"])


def finish(accelerator: Accelerator) -> None:
    """Close the trackers' runs (flush TensorBoard, end the W&B and MLflow runs). Not
    `accelerator.end_training()`: that also destroys the process group."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
