"""Rows for a task head: a text (or text pair) and its label, encoded for sequence classification.

Classification labels may be names or class ids; the class list is `task.labels` or, if unset,
the distinct training labels sorted (numbers numerically), so the same data always gives the
same ids. Regression labels are numbers. A row without its text or label, or with a label
outside the class list, is a `DataError` naming its file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from peftkit.data.audit import SplitAudit
from peftkit.data.cache import store
from peftkit.data.cache.key import data_key
from peftkit.data.chat import ChatTemplate
from peftkit.data.encode import EncodedRow
from peftkit.data.pipeline import PreparedData, mapped_data
from peftkit.data.sources import RawRow, read_source
from peftkit.data.spec import DataSource, DataSpec, TaskSpec
from peftkit.data.split import split_eval
from peftkit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class LabeledRow(EncodedRow):
    """input_ids of the text; `labels` holds one value: the class id, or the regression target."""

    @property
    def n_supervised(self) -> int:
        return 1  # one prediction per row


def class_names(task: TaskSpec, train: list[RawRow]) -> list[str]:
    """The class list: `task.labels`, else the sorted distinct labels of the training rows."""
    if task.labels is not None:
        return list(task.labels)
    seen = {str(_field(r, task.label_field)) for r in train}
    numeric = all(_is_int(v) for v in seen)
    names = sorted(seen, key=int if numeric else str)
    if len(names) < 2:
        raise DataError(
            f"the training data has {len(names)} distinct label(s) in {task.label_field!r}: "
            "a classifier needs at least two"
        )
    return names


def prepare_labeled_data(
    spec: DataSpec, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[PreparedData, list[str] | None]:
    """Read, split and encode a classification/regression dataset; returns it and the class names.

    With `data.cache`, the encoded rows are kept in peftkit's data cache (encoded here, in one
    process, the first time) and memory-mapped from there afterwards."""
    no_template = ChatTemplate("", "none (task head)")
    task_key = task.model_dump(mode="json")
    key = data_key(spec, tokenizer, "", seed, task_key) if spec.cache else None
    if key is None:
        return _prepare_in_memory(spec, task, tokenizer, seed)
    folder = store.cache_dir(key)
    if not (folder / "meta.json").is_file():
        data, names = _prepare_in_memory(spec, task, tokenizer, seed)
        splits = {"train": data.train} | ({"eval": data.eval} if data.eval else {})
        labels = "float32" if names is None else "int64"
        store.write_rows(folder, splits, data.audits, labels, class_names=names)
    data, meta = mapped_data(folder, no_template, LabeledRow)
    return data, meta["class_names"]


def _prepare_in_memory(
    spec: DataSpec, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[PreparedData, list[str] | None]:
    train_raw = _read(spec.train)
    eval_raw = _read(spec.eval)
    train_raw, eval_raw = split_eval(train_raw, eval_raw, spec, seed)
    names = class_names(task, train_raw) if task.type == "classification" else None
    train, train_audit = _encode("train", train_raw, task, names, tokenizer, spec.max_length)
    evals, eval_audit = _encode("eval", eval_raw, task, names, tokenizer, spec.max_length)
    audits = [train_audit] + ([eval_audit] if eval_raw else [])
    no_template = ChatTemplate("", "none (task head)")
    return PreparedData(train, evals, audits, no_template, []), names


def _read(sources: list[DataSource]) -> list[RawRow]:
    rows = []
    for source in sources:
        got = read_source(source)
        if not got:
            raise DataError(f"{source.path}: the dataset is empty")
        rows += got
    return rows


def _encode(
    split: str,
    rows: list[RawRow],
    task: TaskSpec,
    names: list[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> tuple[list[LabeledRow], SplitAudit]:
    audit = SplitAudit(split, rows_read=len(rows))
    index = {name: i for i, name in enumerate(names or [])}
    encoded = []
    for row in rows:
        text = _field(row, task.text_field)
        pair = _field(row, task.text_pair_field) if task.text_pair_field else None
        ids = tokenizer(
            str(text),
            str(pair) if pair is not None else None,
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        label = _label(row, task, index)
        out = LabeledRow(
            np.asarray(ids, dtype=np.int64),
            np.asarray([label], dtype=np.float32 if names is None else np.int64),
            row.origin,
            truncated=len(ids) >= max_length,
        )
        audit.add_kept(out)
        encoded.append(out)
    return encoded, audit


def _label(row: RawRow, task: TaskSpec, index: dict[str, int]) -> float | int:
    value = _field(row, task.label_field)
    if not index:  # regression
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{row.origin}: {task.label_field!r} is {value!r}, not a number (task.type regression)"
            ) from None
    if str(value) in index:
        return index[str(value)]
    if _is_int(value) and 0 <= int(value) < len(index):
        return int(value)
    raise DataError(
        f"{row.origin}: label {value!r} is not one of the classes {list(index)} "
        "(set task.labels to list every class)"
    )


def _field(row: RawRow, name: str) -> Any:
    if name not in row.data or row.data[name] is None:
        raise DataError(f"{row.origin}: no {name!r} field (keys: {sorted(row.data)})")
    return row.data[name]


def _is_int(value: Any) -> bool:
    try:
        return str(int(str(value))) == str(value)
    except ValueError:
        return False
