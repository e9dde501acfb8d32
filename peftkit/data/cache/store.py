"""The data cache on disk: folders of Arrow files under $PEFTKIT_CACHE/data, written atomically
and mapped back as rows (`EncodedRows`: one `EncodedRow` built per index, nothing else held)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from peftkit.caches import data_cache
from peftkit.data.audit import SplitAudit
from peftkit.data.encode import (
    EncodedRow,
)
from peftkit.io import atomic_dir, atomic_write_json, fsync_dir

if TYPE_CHECKING:
    pass

from peftkit.data.cache.key import LAYOUT

log = logging.getLogger(__name__)


USED = "last_used"
"""Touched in a cache folder whenever it is mapped (`prune` removes the least recently used)."""


@contextlib.contextmanager
def building(folder: Path) -> Iterator[Path]:
    """A temporary folder that becomes `folder` when the block succeeds (nothing otherwise).
    Built under a name of this process's own, then renamed: two runs that build the same key at
    once each finish their own, and the first rename wins."""
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (only this user's)
    mine = folder.with_name(f".{folder.name}.{os.getpid()}")
    with atomic_dir(mine, private=True) as tmp:
        yield tmp
    try:
        mine.rename(folder)
        fsync_dir(folder.parent)
    except OSError:  # another process built the same data first: keep its folder
        shutil.rmtree(mine, ignore_errors=True)


def last_used(folder: Path) -> float:
    """When a cache folder was built or last mapped (a time stamp)."""
    stamps = [folder / "meta.json", folder / USED]
    return max(p.stat().st_mtime for p in stamps if p.exists())


def data_root() -> Path:
    """The data cache: $PEFTKIT_CACHE/data (default ~/.cache/peftkit/data; `peftkit.caches`)."""
    return data_cache()


def cache_dir(key: str) -> Path:
    return data_root() / f"{key[:32]}-v{LAYOUT}"


class EncodedRows(Sequence[EncodedRow]):
    """Encoded rows read from memory-mapped Arrow files: `rows[i]` builds one `EncodedRow`;
    `lengths` and `tasks` are whole columns (no row objects are made for them)."""

    def __init__(
        self, table: pa.Table, index: np.ndarray, row_type: type = EncodedRow, labels: str = "int64"
    ) -> None:
        self._row_type, self._label_dtype = row_type, np.dtype(labels)
        self._ids = table.column("input_ids")
        self._labels = table.column("labels")
        self._origin = table.column("origin")
        self._truncated = table.column("truncated")
        self._task = table.column("task")
        self._parts = table.column("parts") if "parts" in table.column_names else None
        self._index = index
        self.lengths = _numbers(pc.list_value_length(self._ids))[index].astype(np.int64)
        tasks = pc.dictionary_encode(self._task).combine_chunks()
        names = np.asarray(tasks.dictionary.to_pylist(), dtype=object)
        self.tasks = names[_numbers(tasks.indices)[index]]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> EncodedRow:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = int(self._index[i])
        return self._row_type(
            _numbers(self._ids[j].values).astype(np.int64),
            _numbers(self._labels[j].values).astype(self._label_dtype),
            self._origin[j].as_py(),
            truncated=self._truncated[j].as_py(),
            task=self._task[j].as_py(),
            **({"parts": _runs(self._parts[j].as_py())} if self._parts is not None else {}),
        )

    def __iter__(self) -> Iterator[EncodedRow]:
        return (self[i] for i in range(len(self)))


def _runs(stored: str | None) -> list[tuple[int, int, str]] | None:
    return [tuple(run) for run in json.loads(stored)] if stored else None


def _numbers(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column without nulls as a numpy array, read from its buffers (pyarrow's
    `to_numpy` imports pandas on first use: half a second of a cached start)."""
    if column.null_count:
        return column.to_numpy(zero_copy_only=False)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [
        np.frombuffer(
            c.buffers()[1],
            dtype=np.dtype(c.type.to_pandas_dtype()),
            count=len(c),
            offset=c.offset * c.type.byte_width,
        )
        for c in chunks
    ]
    if not parts:
        return np.zeros(0, dtype=np.dtype(column.type.to_pandas_dtype()))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def load(
    folder: Path, row_type: type = EncodedRow
) -> tuple[dict[str, EncodedRows], list[SplitAudit], dict[str, Any]]:
    """The splits, audits and metadata (stop tokens, ...) of a cache folder (stamped as used)."""
    meta = json.loads((folder / "meta.json").read_text())
    with contextlib.suppress(OSError):  # (a read-only cache is still read)
        (folder / USED).touch()
    table = read_tables(folder, meta["files"])
    labels = meta.get("labels", "int64")
    rows = {
        split: EncodedRows(
            table, np.load(folder / f"{split}.npy", allow_pickle=False), row_type, labels
        )
        for split in meta["audits"]
    }
    audits = [SplitAudit(**a) for a in meta["audits"].values()]
    return rows, audits, meta


def read_tables(folder: Path, files: list[str]) -> pa.Table:
    """Memory-mapped: the rows stay in the page cache, not in this process's heap."""
    return pa.concat_tables(
        pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all() for name in files
    )


def audit_meta(audit: SplitAudit) -> dict[str, Any]:
    return {k: v for k, v in audit.to_dict().items() if k != "supervised_share"}


def write_rows(
    folder: Path,
    splits: dict[str, Sequence[EncodedRow]],
    audits: list[SplitAudit],
    labels: str,
    **meta: Any,
) -> None:
    """Store rows encoded in memory (task-head data, preference answers) as a cache folder,
    atomically."""
    with building(folder) as tmp:
        start, rows = 0, []
        for split, split_rows in splits.items():
            np.save(tmp / f"{split}.npy", np.arange(start, start + len(split_rows)))
            start += len(split_rows)
            rows += split_rows
        table = pa.table(
            {
                "input_ids": list_array([r.input_ids.astype(np.int32) for r in rows]),
                "labels": list_array(
                    [r.labels for r in rows], pa.float32() if labels == "float32" else pa.int64()
                ),
                "origin": pa.array([r.origin for r in rows], pa.string()),
                "task": pa.array([r.task for r in rows], pa.string()),
                "truncated": pa.array([bool(r.truncated) for r in rows], pa.bool_()),
            }
        )
        with (
            pa.OSFile(str(tmp / "rows.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
        atomic_write_json(
            tmp / "meta.json",
            {
                "files": ["rows.arrow"],
                "audits": {a.split: audit_meta(a) for a in audits},
                "labels": labels,
                **meta,
            },
        )


def list_array_flat(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    """Rows of `lengths` int32 values each, taken back to back from `values`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))


def list_array(arrays: list[np.ndarray], value_type: pa.DataType | None = None) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    values = pa.array(values, value_type or pa.int32())
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)
