"""Find what to export: the run, its recipe and metadata, and the trained result folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import ExportError
from peftkit.io import RunLayout
from peftkit.models.load import damaged_weight_files
from peftkit.recipe.load import load_run_recipe
from peftkit.recipe.schema import Recipe

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json",)


@dataclass
class ExportSource:
    run_dir: Path
    result_dir: Path
    """The adapter (or whole-model) folder being exported: RUN/adapter, RUN/best, RUN/model."""
    recipe: Recipe
    meta: dict[str, Any]
    """RUN/peftkit.json: versions, weights dtype, stop tokens, chat template source."""

    @property
    def whole_model(self) -> bool:
        return self.recipe.adapter.full_weights

    @property
    def mergeable(self) -> bool:
        return self.whole_model or self.recipe.adapter.mergeable


def resolve_source(path: str | Path, trust_remote_code: bool = False) -> ExportSource:
    """Accept a run directory, or a result folder inside one (RUN/adapter, RUN/best, RUN/model).
    A run whose recipe has model.trust_remote_code needs `trust_remote_code`."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"nothing to export at {path}: no such folder")
    if RunLayout(path).recipe.is_file():
        run_dir, result_dir = path, None
    elif RunLayout(path.parent).recipe.is_file():
        run_dir, result_dir = path.parent, path
    else:
        raise ExportError(
            f"{path} is not a peftkit run directory (no {RunLayout(path).recipe.name} here or in its "
            "parent folder); export needs the run to know the base model and data"
        )
    run = RunLayout(run_dir)
    recipe = load_run_recipe(run.recipe, trust_remote_code)
    meta_file = run.meta
    if not meta_file.is_file():
        raise ExportError(
            f"{run_dir} has no {meta_file.name}: the run did not finish, so there is nothing to export"
        )
    meta = json.loads(meta_file.read_text())
    result_dir = result_dir or run_dir / recipe.adapter.final_dir_name
    required = MODEL_FILES if recipe.adapter.full_weights else PEFT_FILES
    missing = [f for f in required if not (result_dir / f).is_file()]
    if recipe.adapter.full_weights and not list(result_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ExportError(f"{result_dir} is incomplete or corrupted: missing {', '.join(missing)}")
    damaged = damaged_weight_files(result_dir)
    if damaged:
        raise ExportError(
            f"{result_dir} is corrupted: damaged or truncated weights file {'; '.join(damaged)}. "
            "Copy the run again (or train it again)"
        )
    return ExportSource(run_dir, result_dir, recipe, meta)
