"""Content fingerprints of data sources: what `--resume` compares and the data cache is keyed by."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def _file_sha(path: Path, digest: Any = None) -> Any:
    digest = digest or hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


_SEEN: dict[tuple[str, int, int, int, int], str] = {}
"""sha256 of the files hashed by this process, by (path, inode, size, mtime, ctime): a start
hashes its data files once, not for every key it computes."""


def source_sha(path: Path) -> str | None:
    """sha256 of a local data file, or of every file (with its name) of a local data folder;
    None for anything else (a hub dataset: its name and revision are in the recipe)."""
    if path.is_file():
        stat = path.stat()
        seen = (
            str(path.resolve()),
            stat.st_ino,
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ctime_ns,
        )
        if seen not in _SEEN:
            _SEEN[seen] = _file_sha(path).hexdigest()
        return _SEEN[seen]
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode() + b"\0")
            _file_sha(f, digest)
        return digest.hexdigest()
    return None
