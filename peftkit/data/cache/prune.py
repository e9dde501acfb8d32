"""Keeping the data cache bounded: remove entries unused for a while, then the least recently used
ones beyond a size (`peftkit prepare --prune`).

An entry is a finished folder `<key>-v<layout>` (`store.cache_dir`); its last use is when it was
built or last mapped (`store.load` stamps it). Pruning never touches a build in progress: a
build writes a hidden folder named after its process (`.<key>-v1.<pid>...`) and renames it into
place only when complete, so a hidden folder whose process still runs is left alone, and one whose
process is gone (a killed build) is removed. An entry used within the last hour (`IN_USE_S`) is
never removed either: a job is starting on it. A job that mapped an older entry keeps reading it
after it is removed (the files stay readable until the job ends); the next start encodes again.
Entries written by another layout (another peftkit version) are never read and always removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftkit import units
from peftkit.data.cache import key, starts, store

IN_USE_S = 3600.0
"""An entry used this recently (seconds) counts as in use and is never removed."""
_ENTRY = re.compile(r"[0-9a-f]{32}-v(\d+)")
_BUILDING = re.compile(r"\.+[0-9a-f]{32}-v\d+\.(\d+)(\..*)?")  # (see store.building)


@dataclass
class PruneReport:
    removed: list[tuple[str, int, str]] = field(default_factory=list)
    """(folder, bytes, why) of every removed (with dry_run: removable) folder."""
    kept: int = 0
    """Entries left."""
    size: int = 0
    """Bytes the entries left hold."""
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {name} ({units.size(n)}): {why}" for name, n, why in self.removed]
        freed = sum(n for _, n, _ in self.removed)
        lines.append(
            f"data cache {store.data_root()}: {self.kept} "
            f"entr{'y' if self.kept == 1 else 'ies'} left, {units.size(self.size)} "
            f"({verb} {len(self.removed)}, {units.size(freed)})"
        )
        return lines


def prune(
    max_bytes: int | None = None,
    unused_days: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Remove entries unused for more than `unused_days`, then the least recently used ones
    until the entries hold at most `max_bytes`; and what killed builds and older layouts left.
    Entries in use (`IN_USE_S`) and builds in progress are kept whatever the limits."""
    now = time.time() if now is None else now
    root = store.data_root()
    report = PruneReport(dry_run=dry_run)
    doomed: list[tuple[Path, str]] = []
    entries: list[tuple[float, Path, int]] = []  # (last use, folder, bytes)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        building = _BUILDING.fullmatch(path.name)
        entry = _ENTRY.fullmatch(path.name)
        if building:
            if not _running(int(building[1])):
                doomed.append((path, "left by a build that no longer runs"))
        elif not entry or not path.is_dir():
            continue  # not an entry (the start records, or someone else's file)
        elif int(entry[1]) != key.LAYOUT or not (path / "meta.json").is_file():
            doomed.append((path, f"written by another peftkit (layout v{entry[1]})"))
        else:
            entries.append((store.last_used(path), path, _size(path)))
    entries.sort()  # least recently used first
    total, kept = sum(n for _, _, n in entries), len(entries)
    for used, path, n in entries:
        idle = now - used
        if idle < IN_USE_S:
            continue
        if unused_days is not None and idle > unused_days * 86400:
            why = f"unused for {idle / 86400:.0f} days"
        elif max_bytes is not None and total > max_bytes:
            why = f"least recently used, over the {units.size(max_bytes)} limit"
        else:
            continue
        doomed.append((path, why))
        total, kept = total - n, kept - 1
    for path, why in doomed:
        report.removed.append((path.name, _size(path), why))
        if not dry_run:
            _remove(path)
    report.kept, report.size = kept, total
    if not dry_run:
        _drop_stale_records(root)
    return report


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove(path: Path) -> None:
    """An entry is renamed out of the way first (one atomic step: gone for every later start),
    then deleted; a kill while deleting leaves a hidden folder of a finished process, which the
    next prune removes."""
    if not path.name.startswith("."):
        hidden = path.with_name(f".{path.name}.{os.getpid()}.pruning")
        try:
            path.rename(hidden)
        except OSError:
            return  # removed by another prune meanwhile
        path = hidden
    shutil.rmtree(path, ignore_errors=True)


def _drop_stale_records(root: Path) -> None:
    """Start records whose folder is gone (`peftkit.data.cache.starts`)."""
    folder = root / starts.STARTS
    for record in folder.glob("*.json") if folder.is_dir() else []:
        try:
            entry = json.loads(record.read_text())["folder"]
        except (OSError, ValueError, KeyError):
            entry = None
        if entry is None or not (root / entry / "meta.json").is_file():
            record.unlink(missing_ok=True)
