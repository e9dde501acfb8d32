"""Shared output I/O, below every package that writes results: atomic writes, the guard that keeps
an output from destroying anything it should not, and the run directory's file names.

Training, export, combine and the sweep all write through these helpers; the layout of a run
directory is typed here once (`RunLayout`), and what marks a folder as a previous peftkit output
of each kind (`OUTPUT_MARKERS`) next to it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError, RunDirError

MANIFEST = "peftkit_adapter.json"
"""In every adapter or model folder peftkit writes: the base and tokenizer it belongs to."""
FIDELITY = "fidelity.json"
"""In every export folder: the fidelity gate's report."""


class RunLayout:
    """The file names of one run directory (what `peftkit train` writes, export and sweep read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recipe = self.path / "recipe.yaml"
        """The resolved recipe the run was started with (defaults filled in)."""
        self.metrics = self.path / "metrics.jsonl"
        self.plot = self.path / "loss.png"
        self.summary = self.path / "summary.json"
        self.audit = self.path / "data_audit.json"
        self.meta = self.path / "peftkit.json"
        """Run metadata: versions, precision, the final folder's name."""
        self.samples = self.path / "samples.json"
        self.answers = self.path / "answers.json"
        self.completions = self.path / "completions.jsonl"
        """Reinforcement-learning runs: a sample of each step's completions with their rewards."""
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
        self.reference_logps = self.path / "reference_logps.safetensors"
        """Preference runs with objective.precompute_ref: the reference's log-prob of each answer."""
        self.checkpoints = self.path / "checkpoints"
        self.best = self.path / "best"
        self.work = self.path / "state"

    def final(self, name: str) -> Path:
        """The folder of the run's result (`adapter`, `model`, ..., the method's `final_dir_name`)."""
        return self.path / name


# What marks a folder as a previous peftkit output of each kind: `overwrite` replaces nothing else.
OUTPUT_MARKERS = {
    "run": (RunLayout("").recipe.name, None),
    "export": (FIDELITY, None),
    "combine": (MANIFEST, "derived_from"),  # a manifest saying it was combined
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


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's contents durable (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder, deepest first: after a power loss a
    renamed folder holds its files' contents, not empty or torn files."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(Path(root, name))
        fsync_dir(Path(root))


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def set_modes(folder: Path, private: bool = False) -> None:
    """Modes of everything under `folder` as a plain `open()`/`mkdir()` leaves them (files 0666,
    folders 0777, less the umask: 0644/0755 usually), whatever the writer used (safetensors
    writes 0600), so another user or a container can read a published result. `private`: 0600
    and 0700 (only this user)."""
    mask = 0o077 if private else _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling and one rename: readers see the old or the new
    file, and after a power loss the new file is whole (fsync before and after the rename)."""
    atomic_write_with(path, lambda tmp: tmp.write_text(text))


def atomic_write_with(path: Path, write: Any) -> None:
    """`write(tmp_path)` writes the file; it then replaces `path` in one rename (durable, and
    readable as a plain `open()` leaves a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _tmp_and_old(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")


@contextmanager
def atomic_dir(target: Path, private: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`.

    The new folder is written as `.NAME.tmp`; the old `target` is renamed to `.NAME.old`, the new
    one to `target`, then the old one removed. A kill at any point leaves the old `target` or the
    new one complete, under its own name or, between the two renames, as `.NAME.old`:
    `recover_atomic_dirs` puts that back. Hidden names never look like a result. Every file is
    fsynced before the rename and the parent folder after it, so a power loss cannot leave a
    renamed but empty result. Modes: see `set_modes` (`private`: this user only, from the start).
    """
    tmp, old = _tmp_and_old(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700 if private else 0o777)
    try:
        yield tmp
        set_modes(tmp, private)
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
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
