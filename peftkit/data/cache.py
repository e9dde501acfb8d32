"""Encoded data on disk: Arrow files built by several processes, memory-mapped, reused by key.

`build` turns the recipe's data section into the same rows, in the same order, with the
same masks and audit as the in-memory pipeline (`pipeline._prepare_in_memory`), but:

- sources are read as a stream into an Arrow file (.jsonl line by line, .parquet batch by batch,
  `save_to_disk` folders and hub datasets row by row), so memory does not grow with the rows;
- rows are encoded by `datasets.Dataset.map` in `data.num_proc` processes;
- the result is kept under `cache_root()/data/<key>/`, written atomically, where `key` is a
  sha256 of everything that changes the encoding: the data files' contents and paths, the
  tokenizer (its full serialisation), the chat template, the data section (max_length, loss_on,
  truncation, system_prompt, formats, limits, ...), the hold-out seed, and the library versions.
  A second run, a resume or another process of a multi-process run maps the files in seconds.

A bad row (invalid JSON, a row that does not fit its format, a chat the template cannot render)
is reported as the first bad row in order, named by file and line, however many processes ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from peftkit.data.audit import SplitAudit
from peftkit.data.encode import (
    KEPT,
    TOO_LONG,
    UNSUPERVISED,
    EncodedRow,
    Encoder,
    RenderedText,
    settle_batch,
)
from peftkit.data.fingerprint import source_sha
from peftkit.data.formats import detect_format, system_turn, to_example
from peftkit.data.sources import RawRow, iter_source, looks_like_local_path, parse_json_line
from peftkit.errors import DataError
from peftkit.io import atomic_dir, atomic_write_json
from peftkit.models.gguf import cache_root
from peftkit.recipe.schema import DataSource, DataSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LAYOUT = 2
"""Bumped whenever the files or the encoding change, so older caches are never read."""
USED = "last_used"
"""Touched in a cache folder whenever it is mapped (`prune` removes the least recently used)."""
ROWS_PER_PROCESS = 2000
"""With `data.num_proc: null`, one process per this many rows (up to the CPUs available)."""
_SPLITS = ("train", "eval", "reference")
_RAW = pa.schema(
    [
        ("raw", pa.binary()),  # a .jsonl line (UTF-8), or a pickled row dict (other sources)
        ("is_line", pa.bool_()),
        ("origin", pa.string()),
        ("format", pa.string()),
        ("task", pa.string()),
        ("reference", pa.bool_()),  # no system prompt, loss on every token
    ]
)


def data_key(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    seed: int,
    task: dict[str, Any] | None = None,
) -> str | None:
    """The cache key of a data section (and, for task heads, the task section), or None when a
    source cannot be fingerprinted (a hub dataset without `revision` may change under the same
    name)."""
    parts = content_parts(spec, seed, task)
    if parts is None:
        return None
    payload = {**parts, "tokenizer": tokenizer_sha(tokenizer), "chat_template": template}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def content_parts(
    spec: DataSpec, seed: int, task: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What the cache key hashes besides the tokenizer and the chat template: the layout, the
    data section, the sources' contents, the task section, the hold-out seed and the versions of
    the libraries that encode (read from their metadata: nothing is imported). None when a
    source cannot be fingerprinted."""
    shas = []
    for source in spec.sources:
        sha = source_sha(Path(source.path).expanduser())
        if sha is None and source.revision is None:
            if not looks_like_local_path(source.path):  # (a missing file is reported by reading)
                log.info("data not cached: hub dataset %s has no revision to pin", source.path)
            return None
        shas.append(sha)
    return {
        "layout": LAYOUT,
        "data": spec.model_dump(mode="json", exclude={"cache", "num_proc", "mixing"}),
        "sources": shas,
        "task": task,
        "seed": seed if spec.eval_fraction > 0 and not spec.eval else None,
        "versions": [metadata.version(n) for n in ("transformers", "tokenizers", "datasets")],
    }


def tokenizer_sha(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything that decides how text becomes ids: a fast tokenizer's whole serialisation
    (normaliser, pre-tokenizer, model, post-processor, added tokens) and the special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[Path]:
    """A temporary folder that becomes `folder` when the block succeeds (nothing otherwise).
    Built under a name of this process's own, then renamed: two runs that build the same key at
    once each finish their own, and the first rename wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    mine = folder.with_name(f".{folder.name}.{os.getpid()}")
    with atomic_dir(mine) as tmp:
        yield tmp
    try:
        mine.rename(folder)
    except OSError:  # another process built the same data first: keep its folder
        shutil.rmtree(mine, ignore_errors=True)


def last_used(folder: Path) -> float:
    """When a cache folder was built or last mapped (a time stamp)."""
    stamps = [folder / "meta.json", folder / USED]
    return max(p.stat().st_mtime for p in stamps if p.exists())


def data_root() -> Path:
    """The data cache: $PEFTKIT_CACHE/data (default ~/.cache/peftkit/data)."""
    return cache_root() / "data"


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
        )

    def __iter__(self) -> Iterator[EncodedRow]:
        return (self[i] for i in range(len(self)))


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
    table = _read_tables(folder, meta["files"])
    labels = meta.get("labels", "int64")
    rows = {
        split: EncodedRows(table, np.load(folder / f"{split}.npy"), row_type, labels)
        for split in meta["audits"]
    }
    audits = [SplitAudit(**a) for a in meta["audits"].values()]
    return rows, audits, meta


def _read_tables(folder: Path, files: list[str]) -> pa.Table:
    """Memory-mapped: the rows stay in the page cache, not in this process's heap."""
    return pa.concat_tables(
        pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all() for name in files
    )


def _audit_meta(audit: SplitAudit) -> dict[str, Any]:
    return {k: v for k, v in audit.to_dict().items() if k != "supervised_share"}


def write_rows(
    folder: Path,
    splits: dict[str, Sequence[EncodedRow]],
    audits: list[SplitAudit],
    labels: str,
    **meta: Any,
) -> None:
    """Store rows encoded in memory (task-head data) as a cache folder, atomically."""
    with _building(folder) as tmp:
        start, rows = 0, []
        for split, split_rows in splits.items():
            np.save(tmp / f"{split}.npy", np.arange(start, start + len(split_rows)))
            start += len(split_rows)
            rows += split_rows
        table = pa.table(
            {
                "input_ids": _list_array([r.input_ids.astype(np.int32) for r in rows]),
                "labels": _list_array(
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
        audit_meta = {a.split: _audit_meta(a) for a in audits}
        atomic_write_json(
            tmp / "meta.json",
            {"files": ["rows.arrow"], "audits": audit_meta, "labels": labels, **meta},
        )


def build_once(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, key: str, seed: int) -> Path:
    """The cache folder of `key`, built first if no cache has it."""
    folder = cache_dir(key)
    if (folder / "meta.json").is_file():
        log.info("encoded data found in %s", folder)
    else:
        build(spec, tokenizer, seed, folder)
    return folder


def build(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, folder: Path) -> None:
    """Read, encode and audit the data into `folder` (atomically: all of it or nothing)."""
    import datasets

    from peftkit.data.pipeline import check_supervised, hold_out_indices

    with _building(folder) as tmp:
        counts = _write_raw(spec, tmp / "raw.arrow")
        n_train, n_eval, n_ref = counts
        # row numbers as arrays, not lists: 8 bytes a row instead of about 36
        train_idx, eval_idx = np.arange(n_train), np.arange(n_train, n_train + n_eval)
        if not n_eval and spec.eval_fraction > 0:
            kept, held = hold_out_indices(n_train, spec.eval_fraction, seed)
            train_idx, eval_idx = np.array(kept, dtype=np.int64), np.array(held, dtype=np.int64)
        if spec.max_eval_rows is not None:
            eval_idx = eval_idx[: spec.max_eval_rows]
        ref_idx = np.arange(n_train + n_eval, n_train + n_eval + n_ref)
        ref_idx = ref_idx[: spec.max_reference_rows]
        order = np.concatenate([train_idx, eval_idx, ref_idx])
        raw = datasets.Dataset.from_file(str(tmp / "raw.arrow"))
        if not np.array_equal(order, np.arange(len(raw))):
            raw = raw.select(order, keep_in_memory=True)
        n_proc = _processes(spec.num_proc, len(raw))
        log.info("encoding %d rows in %d process(es) into %s", len(raw), n_proc, folder)
        encoded = raw.with_format("arrow").map(
            _BatchEncoder(tokenizer, spec),
            batched=True,
            batch_size=256,
            num_proc=n_proc if n_proc > 1 else None,
            remove_columns=raw.column_names,
            cache_file_name=str(tmp / "rows.arrow"),
            new_fingerprint=folder.name,
            desc="encoding rows",
        )
        files = [Path(f["filename"]).name for f in encoded.cache_files]
        del raw
        (tmp / "raw.arrow").unlink()
        table = _read_tables(tmp, files)
        _raise_first_error(table)
        status = table.column("status").to_numpy()
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
        supervised = table.column("n_supervised").to_numpy()
        truncated = table.column("truncated").to_numpy(zero_copy_only=False)
        audits: dict[str, dict[str, Any]] = {}
        start = 0
        for split, n in zip(_SPLITS, (len(train_idx), len(eval_idx), len(ref_idx))):
            if split != "train" and n == 0:
                continue
            rows = np.arange(start, start + n)
            start += n
            kept = rows[status[rows] == KEPT]
            unsupervised = rows[status[rows] == UNSUPERVISED]
            audit = SplitAudit(
                split,
                rows_read=n,
                rows_kept=len(kept),
                tokens=int(lengths[kept].sum()),
                supervised_tokens=int(supervised[kept].sum()),
                rows_truncated=int(truncated[kept].sum()),
                rows_dropped_too_long=int((status[rows] == TOO_LONG).sum()),
                rows_without_supervised_tokens=len(unsupervised),
                max_row_tokens=int(lengths[kept].max(initial=0)),
                examples_without_supervision=table.column("origin")
                .take(unsupervised[:3])
                .to_pylist(),
            )
            check_supervised(split, audit)
            np.save(tmp / f"{split}.npy", kept)
            audits[split] = _audit_meta(audit)
        n_task = len(train_idx) + len(eval_idx)
        stops = pc.unique(table.column("stop").slice(0, n_task)).to_pylist()
        stop_tokens = sorted({t for joined in stops for t in joined.split("\0") if t})
        # two distinct leading system turns are enough to tell "one for every chat" from "varied"
        systems = pc.unique(table.column("system").slice(0, n_task)).drop_null()
        meta = {"files": files, "audits": audits, "stop_tokens": stop_tokens}
        atomic_write_json(
            tmp / "meta.json", {**meta, "system_turns": sorted(systems[:2].to_pylist())}
        )


def _processes(setting: int | None, rows: int) -> int:
    if setting is not None:
        return max(1, min(setting, rows))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, rows // ROWS_PER_PROCESS))


def _write_raw(spec: DataSpec, path: Path) -> tuple[int, int, int]:
    """Every row of the train, eval and reference sources, unparsed, into one Arrow file;
    returns the row count of each. The format of a source is detected from its first row."""
    counts = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _RAW) as writer:
        for split, sources in zip(_SPLITS, (spec.train, spec.eval, spec.reference)):
            n = 0
            for source in sources:
                task = {
                    "train": source.task_name,
                    "eval": spec.eval_task(source),
                    "reference": "reference",
                }[split]
                n += _write_source(writer, source, task, split == "reference")
            counts.append(n)
    return counts[0], counts[1], counts[2]


def _write_source(
    writer: pa.ipc.RecordBatchStreamWriter, source: DataSource, task: str, ref: bool
) -> int:
    fmt = None if source.format == "auto" else source.format
    n, batch = 0, []
    for item in iter_source(source):
        if isinstance(item, RawRow):
            raw, is_line, origin = pickle.dumps(item.data), False, item.origin
        else:
            (line, origin), is_line = item, True
            raw = line.encode()
        if fmt is None:
            first = (
                item if isinstance(item, RawRow) else RawRow(parse_json_line(line, origin), origin)
            )
            fmt = detect_format(first)
        batch.append((raw, is_line, origin))
        n += 1
        if len(batch) == 4096:
            _write_batch(writer, batch, fmt, task, ref)
            batch = []
    if batch:
        _write_batch(writer, batch, fmt, task, ref)
    if n == 0:
        raise DataError(f"{source.path}: the dataset is empty")
    return n


def _write_batch(
    writer, batch: list[tuple[bytes, bool, str]], fmt: str, task: str, ref: bool
) -> None:
    raw, is_line, origin = zip(*batch)
    n = len(batch)
    writer.write_batch(
        pa.record_batch(
            [
                pa.array(raw, pa.binary()),
                pa.array(is_line, pa.bool_()),
                pa.array(origin, pa.string()),
                pa.array([fmt] * n, pa.string()),
                pa.array([task] * n, pa.string()),
                pa.array([ref] * n, pa.bool_()),
            ],
            schema=_RAW,
        )
    )


class _BatchEncoder:
    """`Dataset.map` function: raw rows in, encoded rows out (in each worker process)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: DataSpec) -> None:
        self.tokenizer = tokenizer
        self.loss_on = spec.loss_on
        self.system_prompt = spec.system_prompt
        self.max_length = spec.max_length
        self.truncation = spec.truncation
        self._encoders: dict[bool, Encoder] = {}

    def _encoder(self, reference: bool) -> Encoder:
        if reference not in self._encoders:  # the reference set: loss on every token
            self._encoders[reference] = Encoder(
                self.tokenizer, "all" if reference else self.loss_on
            )
        return self._encoders[reference]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        texts: list[RenderedText | None] = [None] * n
        stops, errors = [""] * n, [None] * n
        systems: list[str | None] = [None] * n
        columns = [batch.column(c).to_pylist() for c in ("raw", "is_line", "origin", "format")]
        references = batch.column("reference").to_pylist()
        for i, (raw, is_line, origin, fmt) in enumerate(zip(*columns)):
            ref = references[i]
            encoder = self._encoder(ref)
            encoder.stop_tokens.clear()
            try:
                data = parse_json_line(raw.decode(), origin) if is_line else pickle.loads(raw)
                example = to_example(RawRow(data, origin), fmt, None if ref else self.system_prompt)
                texts[i] = encoder.render(example)
            except DataError as e:
                errors[i] = str(e)
                continue
            if not ref:  # the reference set's end-of-turn tokens are not the task's
                stops[i] = "\0".join(sorted(encoder.stop_tokens))
                systems[i] = system_turn(example)
        ok = np.array([t is not None for t in texts], dtype=bool)  # rows that rendered
        # one tokenizer call for the batch (the loss policy is in the rendered spans already)
        encoded = self._encoder(False).tokenize_batch([t for t in texts if t is not None])
        fate, kept, supervised, truncated = settle_batch(encoded, self.max_length, self.truncation)
        out = np.where(fate == KEPT, kept, 0)  # tokens written per rendered row
        status = np.full(n, -1, dtype=np.int8)
        status[ok] = fate
        lengths = np.zeros(n, dtype=np.int64)
        lengths[ok] = out
        n_supervised = np.zeros(n, dtype=np.int32)
        n_supervised[ok] = supervised
        was_truncated = np.zeros(n, dtype=bool)
        was_truncated[ok] = truncated
        # the first `out` tokens of each rendered row, back to back
        starts = np.repeat(encoded.bounds[:-1] - np.cumsum(out) + out, out)
        take = np.arange(int(out.sum()), dtype=np.int64) + starts
        return pa.table(
            {
                "input_ids": _list_array_flat(lengths, encoded.ids[take]),
                "labels": _list_array_flat(lengths, encoded.labels[take]),
                "origin": batch.column("origin"),
                "task": batch.column("task"),
                "status": pa.array(status, pa.int8()),
                "n_supervised": pa.array(n_supervised, pa.int32()),
                "truncated": pa.array(was_truncated, pa.bool_()),
                "stop": pa.array(stops, pa.string()),
                "system": pa.array(systems, pa.string()),
                "error": pa.array(errors, pa.string()),
            }
        )


def _list_array_flat(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    """Rows of `lengths` int32 values each, taken back to back from `values`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))


def _list_array(arrays: list[np.ndarray], value_type: pa.DataType | None = None) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    values = pa.array(values, value_type or pa.int32())
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def _raise_first_error(table: pa.Table) -> None:
    """The first bad row in order, as the in-memory pipeline would name it."""
    errors = table.column("error")
    if errors.null_count == len(errors):
        return
    first = pc.index(pc.is_valid(errors), True).as_py()
    raise DataError(errors[first].as_py())
