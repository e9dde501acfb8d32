"""Encoded data on disk: Arrow files built by several processes, memory-mapped, reused by key.

`build` turns the recipe's data section into the same rows, in the same order, with the
same masks and audit as the in-memory pipeline (`pipeline._prepare_in_memory`), but:

- sources are read as a stream into an Arrow file (.jsonl line by line, .parquet batch by batch,
  `save_to_disk` folders and hub datasets row by row), so memory does not grow with the rows;
- rows are encoded by `datasets.Dataset.map` in `data.num_proc` processes;
- the result is kept under `caches.data_cache()/<key>/`, written atomically, where `key` is a
  sha256 of everything that changes the encoding: the data files' contents and paths, the
  tokenizer (its identity, `models.tokenizer_identity`), the chat template, the data section
  (max_length, loss_on, truncation, system_prompt, formats, limits, ...), the hold-out seed, and
  the library versions.
  A second run, a resume or another process of a multi-process run maps the files in seconds.

A bad row (invalid JSON, a row that does not fit its format, a chat the template cannot render)
is reported as the first bad row in order, named by file and line, however many processes ran.
"""

from __future__ import annotations

import json
import logging
import os
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
    Encoder,
    RenderedText,
    settle_batch,
)
from peftkit.data.formats import detect_format, system_turn, to_example
from peftkit.data.sources import RawRow, iter_source, parse_json_line
from peftkit.data.spec import DataSource, DataSpec
from peftkit.errors import DataError
from peftkit.io import atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from peftkit.data.cache import store
from peftkit.data.split import check_supervised, hold_out_indices

log = logging.getLogger(__name__)


ROWS_PER_PROCESS = 2000
"""With `data.num_proc: null`, one process per this many rows (up to the CPUs available)."""
_SPLITS = ("train", "eval", "reference")
_RAW = pa.schema(
    [
        ("raw", pa.binary()),  # a .jsonl line, or a row of another source as JSON (UTF-8)
        ("is_line", pa.bool_()),
        ("origin", pa.string()),
        ("format", pa.string()),
        ("task", pa.string()),
        ("reference", pa.bool_()),  # no system prompt, loss on every token
    ]
)


def build_once(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, key: str, seed: int) -> Path:
    """The cache folder of `key`, built first if no cache has it."""
    folder = store.cache_dir(key)
    if (folder / "meta.json").is_file():
        log.info("encoded data found in %s", folder)
    else:
        build(spec, tokenizer, seed, folder)
    return folder


def build(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, folder: Path) -> None:
    """Read, encode and audit the data into `folder` (atomically: all of it or nothing)."""
    import datasets

    with store.building(folder) as tmp:
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
        table = store.read_tables(tmp, files)
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
            audits[split] = store.audit_meta(audit)
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
            raw, is_line, origin = _row_json(item.data), False, item.origin
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


def _row_json(data: dict[str, Any]) -> bytes:
    """A row of a parquet file, saved dataset or hub dataset as JSON, never pickled: the encoding
    processes read it back from the cache folder, where unpickling a planted file would run it."""
    return json.dumps(data, ensure_ascii=False, default=_json_value).encode()


def _json_value(value: Any) -> Any:
    """Values JSON has no type for: numpy arrays and scalars as lists and numbers, dates as ISO
    text, anything else (bytes, ...) as its text."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


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
        self.tools = spec.tools
        self.reasoning, self.template_variables = spec.reasoning, spec.chat_template_kwargs
        self._encoders: dict[bool, Encoder] = {}

    def _encoder(self, reference: bool) -> Encoder:
        if reference not in self._encoders:  # the reference set: loss on every token
            self._encoders[reference] = Encoder(
                self.tokenizer,
                "all" if reference else self.loss_on,
                self.reasoning,
                self.template_variables,
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
                data = parse_json_line(raw.decode(), origin) if is_line else json.loads(raw)
                example = to_example(
                    RawRow(data, origin),
                    fmt,
                    None if ref else self.system_prompt,
                    None if ref else self.tools,
                )
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
        parts: list[str | None] = [None] * n  # agent parts as JSON token runs, for the audit
        if encoded.parts:
            for i, runs in zip(np.flatnonzero(ok), encoded.parts):
                parts[i] = json.dumps(runs) if runs else None
        # the first `out` tokens of each rendered row, back to back
        starts = np.repeat(encoded.bounds[:-1] - np.cumsum(out) + out, out)
        take = np.arange(int(out.sum()), dtype=np.int64) + starts
        return pa.table(
            {
                "input_ids": store.list_array_flat(lengths, encoded.ids[take]),
                "labels": store.list_array_flat(lengths, encoded.labels[take]),
                "origin": batch.column("origin"),
                "task": batch.column("task"),
                "status": pa.array(status, pa.int8()),
                "n_supervised": pa.array(n_supervised, pa.int32()),
                "truncated": pa.array(was_truncated, pa.bool_()),
                "stop": pa.array(stops, pa.string()),
                "system": pa.array(systems, pa.string()),
                "error": pa.array(errors, pa.string()),
                "parts": pa.array(parts, pa.string()),
            }
        )


def _raise_first_error(table: pa.Table) -> None:
    """The first bad row in order, as the in-memory pipeline would name it."""
    errors = table.column("error")
    if errors.null_count == len(errors):
        return
    first = pc.index(pc.is_valid(errors), True).as_py()
    raise DataError(errors[first].as_py())
