"""From the recipe's data section to encoded train/eval rows plus their audit."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from peftkit.data.audit import SplitAudit
from peftkit.data.chat import ChatTemplate, resolve_chat_template
from peftkit.data.encode import EncodedRow, Encoder, truncate
from peftkit.data.formats import Example, detect_format, to_example
from peftkit.data.sources import read_source
from peftkit.errors import DataError
from peftkit.recipe.schema import DataSource, DataSpec


@dataclass
class PreparedData:
    train: list[EncodedRow]
    eval: list[EncodedRow]
    audits: list[SplitAudit]
    chat_template: ChatTemplate
    stop_tokens: list[str]
    """End-of-turn tokens that training supervised; generation must stop on them."""
    reference: list[EncodedRow] = field(default_factory=list)
    """General-text rows scored on every token for the forgetting report (`data.reference`)."""


def prepare_data(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Read, normalise, split, encode and audit the data. Raises `DataError` on anything unusable."""
    template = resolve_chat_template(tokenizer, spec.chat_template)
    train_examples = _read_examples(spec.train, spec.system_prompt, lambda s: s.task_name)
    eval_examples = _read_examples(spec.eval, spec.system_prompt, spec.eval_task)
    if not eval_examples and spec.eval_fraction > 0:
        train_examples, eval_examples = hold_out(train_examples, spec.eval_fraction, seed)
    if spec.max_eval_rows is not None:
        eval_examples = eval_examples[: spec.max_eval_rows]
    encoder = Encoder(tokenizer, spec.loss_on)
    train, train_audit = _encode_split("train", train_examples, encoder, spec)
    evals, eval_audit = (
        _encode_split("eval", eval_examples, encoder, spec) if eval_examples else ([], None)
    )
    audits = [train_audit] + ([eval_audit] if eval_audit else [])
    reference: list[EncodedRow] = []
    if spec.reference:
        # Language-modelling loss on every token, whatever data.loss_on says for the task.
        # ... and as written: the task's system prompt is no part of what the base should keep.
        examples = _read_examples(spec.reference, None, lambda s: "reference")
        reference, ref_audit = _encode_split(
            "reference", examples[: spec.max_reference_rows], Encoder(tokenizer, "all"), spec
        )
        audits.append(ref_audit)
    return PreparedData(train, evals, audits, template, sorted(encoder.stop_tokens), reference)


T = TypeVar("T")
Tagged = tuple[str, Example]
"""An example with the task it belongs to."""


def _read_examples(
    sources: list[DataSource], system_prompt: str | None, task_of: Callable[[DataSource], str]
) -> list[Tagged]:
    examples: list[Tagged] = []
    for source in sources:
        rows = read_source(source)
        if not rows:
            raise DataError(f"{source.path}: the dataset is empty")
        fmt = source.format if source.format != "auto" else detect_format(rows[0])
        task = task_of(source)
        examples += [(task, to_example(row, fmt, system_prompt)) for row in rows]
    return examples


def hold_out(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded `fraction` of the examples held out, both in their original order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(
            f"data.eval_fraction {fraction} leaves no training rows out of {len(examples)}"
        )
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _encode_split(
    split: str, examples: list[Tagged], encoder: Encoder, spec: DataSpec
) -> tuple[list[EncodedRow], SplitAudit]:
    audit = SplitAudit(split, rows_read=len(examples))
    rows = []
    for task, example in examples:
        row = encoder.encode(example)
        row.task = task
        if len(row.input_ids) > spec.max_length and spec.truncation == "drop":
            audit.rows_dropped_too_long += 1
            continue
        row = truncate(row, spec.max_length)
        if row.n_supervised == 0:
            audit.add_unsupervised(row)
            continue
        audit.add_kept(row)
        rows.append(row)
    if not rows:
        raise DataError(
            f"no {split} row has any supervised token ({audit.rows_read} read, "
            f"{audit.rows_without_supervised_tokens} without supervised tokens, "
            f"{audit.rows_dropped_too_long} too long; e.g. {', '.join(audit.examples_without_supervision) or '-'}). "
            "Check that rows contain assistant turns or completions, raise data.max_length, "
            "or set data.loss_on: all"
        )
    return rows, audit
