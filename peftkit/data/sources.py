"""Read raw rows from local files, `datasets.save_to_disk` folders and hub datasets.

Every row keeps its origin (`file.jsonl line 17`) so that a bad row can be named exactly.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.data.spec import DataSource
from peftkit.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class RawRow:
    data: dict[str, Any]
    origin: str
    """Where the row came from, for error messages: `path line N` or `dataset[split] row N`."""


def read_source(source: DataSource) -> list[RawRow]:
    """All rows of one source (up to `source.limit`), each with its origin."""
    return list(_limited(_iter_source(source), source.limit))


def iter_source(source: DataSource) -> Iterator[RawRow | tuple[str, str]]:
    """The rows of one source (up to `source.limit`) one at a time: `RawRow`s, except that a
    .jsonl file gives its unparsed `(line, origin)` pairs (see `iter_jsonl_lines`)."""
    return _limited(_iter_source(source, streaming=True), source.limit)


def _limited(rows: Iterator, limit: int | None) -> Iterator:
    return rows if limit is None else itertools.islice(rows, limit)


def _iter_source(source: DataSource, streaming: bool = False) -> Iterator:
    path = Path(source.path).expanduser()
    if path.is_file():
        suffix = "".join(path.suffixes[-1:]).lower()
        if streaming and suffix == ".jsonl":
            yield from iter_jsonl_lines(path)
            return
        readers = {
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".csv": _read_csv,
            ".parquet": _read_parquet,
        }
        if suffix not in readers:
            raise DataError(
                f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}"
            )
        yield from readers[suffix](path)
    elif path.is_dir():
        yield from _read_saved_dataset(path, source.split)
    elif looks_like_local_path(source.path):
        raise DataError(f"data file not found: {source.path}")
    else:
        yield from _read_hub_dataset(source)


def looks_like_local_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or text.lower().endswith(FILE_SUFFIXES)
        or text.count("/") > 1
        or "\\" in text
    )


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; other bytes are a `DataError` naming the line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with io.StringIO(_read_text(path), newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                origin = f"{path} line {lineno}"
                yield RawRow(parse_json_line(line, origin), origin)


def parse_json_line(line: str, origin: str) -> dict[str, Any]:
    """One JSON Lines row; anything but a JSON object is a `DataError` naming `origin`."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{origin}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{origin}: expected a JSON object, got {type(data).__name__}")
    return data


def iter_jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(line, origin) for every non-blank line of a .jsonl file, read as a stream (constant
    memory); the lines are parsed later by `parse_json_line`. Same line numbers and UTF-8 errors
    as `_read_jsonl`."""
    try:
        with path.open(encoding="utf-8", newline=None) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield line, f"{path} line {lineno}"
    except UnicodeDecodeError:
        _read_text(path)  # raises the DataError that names the line and column
        raise


def _read_json(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON array of rows (or {{"data": [...]}})')
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(item).__name__}")
        yield RawRow(item, f"{path} record {i}")


def _read_csv(path: Path) -> Iterator[RawRow]:
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        for item in reader:
            if None in item:
                raise DataError(f"{path} line {reader.line_num}: more fields than the header has")
            yield RawRow(dict(item), f"{path} line {reader.line_num}")


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    i = 0
    try:  # batch by batch: a file larger than memory streams
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                yield RawRow(item, f"{path} row {i}")
                i += 1
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None


def _read_saved_dataset(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: folder is not a datasets save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; available: {', '.join(ds)}")
        ds = ds[split]
    for i, item in enumerate(ds):
        yield RawRow(item, f"{path}[{split}] row {i}")


def _read_hub_dataset(source: DataSource) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(
            source.path, source.subset, split=source.split, revision=source.revision
        )
    except Exception as e:  # datasets raises many types: network, missing config, missing split
        raise DataError(
            f"could not load {source.path!r} as a local file or a hub dataset: {e}\n"
            "  hint: local files need an existing path; hub datasets need network access"
        ) from None
    for i, item in enumerate(ds):
        yield RawRow(item, f"{source.path}[{source.split}] row {i}")
