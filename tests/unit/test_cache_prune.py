"""`peftkit prepare --prune`: entries unused for long, then the least recently used beyond a size,
are removed; a build in progress, an entry just used and what other tools keep there are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peftkit.cli import main
from peftkit.data.audit import SplitAudit
from peftkit.data.cache import key, starts, store
from peftkit.data.cache.prune import IN_USE_S, prune
from peftkit.data.encode import EncodedRow

DAY = 86400.0
NOW = time.time()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


def entry(name: str, size: int, used_days_ago: float, layout: int = key.LAYOUT) -> Path:
    """A finished cache folder of `size` bytes, last used that many days ago."""
    folder = store.data_root() / f"{name * 32}-v{layout}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    (folder / "rows.arrow").write_bytes(b"\0" * size)
    stamp = NOW - used_days_ago * DAY
    os.utime(folder / "meta.json", (stamp, stamp))
    return folder


def dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def names(report) -> set[str]:
    return {name for name, _, _ in report.removed}


def test_unused_entries_then_the_least_recently_used_beyond_the_size_go():
    old, mid, new, recent = (entry(c, 1000, d) for c, d in zip("abcd", (40, 5, 2, 0.01)))
    stale = entry("e", 10, 1, layout=key.LAYOUT + 7)  # another peftkit's layout: never read
    report = prune(max_bytes=2500, unused_days=30, dry_run=True, now=NOW)
    assert names(report) == {old.name, mid.name, stale.name}
    assert all(p.exists() for p in (old, mid, stale))  # a dry run removes nothing
    report = prune(max_bytes=2500, unused_days=30, now=NOW)
    assert not old.exists() and not mid.exists() and not stale.exists()
    assert new.exists() and recent.exists()
    assert (report.kept, report.size) == (2, 2 * (1000 + 2))  # rows and a 2-byte meta.json
    # an entry used within the last hour counts as in use, whatever the limits
    assert names(prune(max_bytes=0, unused_days=0, now=NOW)) == {new.name}
    assert recent.exists() and IN_USE_S > 0.01 * DAY


def test_mapping_an_entry_marks_it_used():
    folder = store.cache_dir("a" * 64)
    row = EncodedRow(np.array([1, 2]), np.array([1, 2]), "row 1")
    store.write_rows(folder, {"train": [row]}, [SplitAudit("train", rows_kept=1)], "int64")
    os.utime(folder / "meta.json", (NOW - 90 * DAY, NOW - 90 * DAY))
    assert names(prune(unused_days=30, dry_run=True, now=NOW)) == {folder.name}
    store.load(folder)  # what a training start or a cached prepare does
    assert NOW - store.last_used(folder) < 60
    assert prune(unused_days=30, now=NOW).removed == []


def test_a_build_in_progress_is_never_removed_and_a_killed_ones_debris_is():
    folder = store.cache_dir("f" * 64)
    killed = store.data_root() / f".{folder.name}.{dead_pid()}"
    killed.mkdir(parents=True)
    with store.building(folder) as tmp:  # this process is writing the entry
        (tmp / "meta.json").write_text("{}")
        report = prune(max_bytes=0, unused_days=0, now=NOW + 365 * DAY)
        assert names(report) == {killed.name}
        assert tmp.exists() and not killed.exists()
    assert (folder / "meta.json").is_file()  # renamed into place, complete


def test_start_records_of_removed_entries_go_too():
    gone, kept = entry("a", 10, 60), entry("b", 10, 0)
    records = store.data_root() / starts.STARTS
    records.mkdir()
    for folder in (gone, kept):
        (records / f"{folder.name[:8]}.json").write_text(json.dumps({"folder": folder.name}))
    (store.data_root() / "notes.txt").write_text("someone else's file")
    prune(unused_days=30, now=NOW)
    assert [p.name for p in records.iterdir()] == [f"{kept.name[:8]}.json"]
    assert (store.data_root() / "notes.txt").is_file()


def test_prepare_prune_verb(capsys):
    old = entry("a", 2**20, 45)
    assert main(["prepare", "--prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {old.name}" in out and "unused for 45 days" in out and old.exists()
    assert main(["prepare", "--prune", "--max-gb", "1", "--unused-days", "60"]) == 0
    assert old.exists()
    assert main(["prepare", "--prune"]) == 0  # default: 30 days
    assert not old.exists()
    assert main(["prepare"]) == 2  # a recipe, or --prune
