"""The run directory: its layout, the start-up checks that protect an existing run, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError, RunDirError

# Recipe fields that may change between a run and its resumption: they do not change the math
# of the steps already taken, only how long or how often things happen, or (lr, clipping, warmup:
# what the advice after a divergence tells the user to change) the steps still to come. Each
# change is recorded in RUN/resumes.jsonl.
RESUMABLE_CHANGES = (
    "train.lr",
    "train.max_grad_norm",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    # batching only changes float summation order, not the math (tests/e2e/test_training_math.py)
    "train.packing",
    "train.group_by_length",
    "train.supervised_logits_only",
    "train.early_stopping",
    "output.plot",
    "output.report_to",
    "output.save_best",
    "output.overwrite",
    "output.sample_prompts",
    "output.sample_max_new_tokens",
    "output.dir",
    "export.",
)


class RunDir:
    """Paths of one run and the rules for creating, resuming and writing into it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recipe = self.path / "recipe.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.plot = self.path / "loss.png"
        self.summary = self.path / "summary.json"
        self.audit = self.path / "data_audit.json"
        self.meta = self.path / "peftkit.json"
        self.samples = self.path / "samples.json"
        self.answers = self.path / "answers.json"
        self.resumes = self.path / "resumes.jsonl"
        """One line per --resume: when, and the recipe changes it made."""
        self.report = self.path / "report.html"
        """Curves, recipe, data audit, answers, forgetting, fidelity: one self-contained page."""
        self.exports = self.path / "exports.jsonl"
        """One line per `peftkit export` of this run: where it went (report.html links it)."""
        self.trackers = self.path / "trackers.json"
        """The experiment trackers' run ids, so that a resumed run appends to the same runs."""
        self.inputs = self.path / "inputs.json"
        """Fingerprints of the data files, tokenizer and chat template the run started with."""
        self.checkpoints = self.path / "checkpoints"
        self.best = self.path / "best"
        self.work = self.path / "state"

    def final(self, name: str) -> Path:
        return self.path / name

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
            saved = yaml.safe_load(self.recipe.read_text())
            # through today's schema: keys added since the run was made read as their defaults
            from peftkit.recipe.load import validate_recipe

            saved = validate_recipe(saved, str(self.recipe)).model_dump(mode="json")
            diff = _diff(saved, recipe_dump)
            changed = [k for k in diff if not k.startswith(RESUMABLE_CHANGES)]
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


# What marks a folder as a previous peftkit output of each kind: `overwrite` replaces nothing else.
OUTPUT_MARKERS = {
    "run": ("recipe.yaml", None),
    "export": ("fidelity.json", None),
    "combine": ("peftkit_adapter.json", "derived_from"),  # a manifest saying it was combined
}


def is_output_of_kind(folder: Path, kind: str) -> bool:
    marker, key = OUTPUT_MARKERS[kind]
    if not (folder / marker).is_file():
        return False
    if key is None:
        return True
    try:
        return bool(json.loads((folder / marker).read_text()).get(key))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def guard_output(
    out: str | Path,
    kind: str,
    inputs: Sequence[str | Path],
    overwrite: bool,
    flag: str,
    error: type[PeftkitError] = RunDirError,
) -> None:
    """Refuse to write `out` when that could destroy something that is not a `kind` output.

    `out` may not equal, lie inside, or contain any of `inputs` (writing replaces the whole folder);
    a non-empty `out` is replaced only with `overwrite`, and only when it holds a previous peftkit
    output of the same kind. `flag` is how the user asks for overwriting (named in the message).
    """
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if not given:
            continue
        source = Path(given).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = (
                "is"
                if target == source
                else ("is inside" if source in target.parents else "contains")
            )
            raise error(
                f"the output folder {out} {relation} the input {given}: writing it would destroy "
                "the input. Choose an output folder outside every input"
            )
    if out.exists() and not out.is_dir():
        raise error(f"the output folder {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise error(
            f"{out} already exists and is not empty: choose another output folder or {flag}"
        )
    if not is_output_of_kind(out, kind):
        raise error(
            f"{out} is not a previous peftkit {kind} (no {OUTPUT_MARKERS[kind][0]} of one); "
            f"{flag} only replaces one of those. Choose another output folder"
        )


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _tmp_and_old(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`.

    The new folder is written as `.NAME.tmp`; the old `target` is renamed to `.NAME.old`, the new
    one to `target`, then the old one removed. A kill at any point leaves the old `target` or the
    new one complete, under its own name or, between the two renames, as `.NAME.old`:
    `recover_atomic_dirs` puts that back. Hidden names never look like a result.
    """
    tmp, old = _tmp_and_old(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_atomic_dirs(folder: Path) -> None:
    """Undo what a kill inside `atomic_dir` left in `folder`: an unfinished `.NAME.tmp` is
    removed; an old `.NAME.old` is renamed back to NAME if NAME is missing, else removed."""
    for old in folder.glob(".*.old"):
        target = old.with_name(old.name[1 : -len(".old")])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    for tmp in folder.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
