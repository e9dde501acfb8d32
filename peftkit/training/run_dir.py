"""The start-up checks that protect an existing run directory (its layout is `peftkit.io.RunLayout`)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import RunDirError
from peftkit.io import RunLayout, atomic_write_text, guard_output, recover_atomic_dirs
from peftkit.recipe.load import load_run_recipe
from peftkit.recipe.schema import Recipe
from peftkit.section import resumable_paths


class RunDir(RunLayout):
    """A run directory's layout (`peftkit.io.RunLayout`) and the rules for creating and resuming it."""

    def complete_checkpoints(self) -> list[Path]:
        """Its checkpoint folders whose last file was written, oldest first."""
        from peftkit.training.checkpoint import complete_checkpoints

        return complete_checkpoints(self.checkpoints)

    def check_can_start(
        self,
        resume: bool,
        overwrite: bool,
        recipe_dump: dict[str, Any],
        inputs: Sequence[str] = (),
    ) -> dict[str, list[Any]]:
        """Refuse to start when starting would damage an existing run or an input (`inputs`: the
        data files, model and tokenizer folders). Writes nothing. Returns the allowed changes a
        resume makes to the recipe: {key: [before, now]}."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output.dir {self.path} is a file, not a folder: choose a folder")
        exists = self.path.exists() and any(self.path.iterdir())
        if resume:
            if not self.recipe.exists():
                raise RunDirError(f"--resume: {self.path} holds no run to resume (no recipe.yaml)")
            # through today's schema: keys added since the run was made read as their defaults
            # (the command that resumes has checked model.trust_remote_code: see api.train)
            saved = load_run_recipe(self.recipe, trust_remote_code=True).model_dump(mode="json")
            diff = _diff(saved, recipe_dump)
            resumable = resumable_paths(Recipe)  # the fields marked RESUMABLE in the schema
            changed = [k for k in diff if not any(_within(k, p) for p in resumable)]
            if changed:
                raise RunDirError(
                    f"--resume: the recipe differs from the one {self.path} was trained with in "
                    f"{', '.join(changed)}; resuming would not continue the same run. Use a new output.dir"
                )
            return {k: [_get(saved, k), _get(recipe_dump, k)] for k in diff}
        elif exists and not overwrite:
            raise RunDirError(
                f"run directory {self.path} already exists and is not empty. Resume it with --resume, "
                "choose another output.dir, or set output.overwrite=true to replace it"
            )
        else:
            guard_output(self.path, "run", inputs, overwrite, "set output.overwrite=true")
        return {}

    def begin(
        self,
        resume: bool,
        overwrite: bool,
        recipe_dump: dict[str, Any],
        changes: dict[str, list[Any]] | None = None,
    ) -> None:
        """Create (or, with overwrite, replace) the run directory and record the resolved recipe;
        a resume's recipe `changes` are appended to resumes.jsonl."""
        if not resume and overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        if resume:
            recover_atomic_dirs(self.path)  # a kill while a result (best/, adapter/) was written
            record = {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changes or {}}
            with self.resumes.open("a") as f:
                f.write(json.dumps(record) + "\n")
        atomic_write_text(self.recipe, yaml.safe_dump(recipe_dump, sort_keys=False))


def _within(key: str, path: str) -> bool:
    return key == path or key.startswith(path + ".")


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]
