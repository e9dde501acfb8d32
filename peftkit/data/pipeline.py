"""From the recipe's data section to encoded train/eval rows plus their audit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.data.audit import SplitAudit
from peftkit.data.cache import build, store
from peftkit.data.cache.key import data_key
from peftkit.data.chat import ChatTemplate, resolve_chat_template
from peftkit.data.encode import TOO_LONG, UNSUPERVISED, EncodedRow, Encoder, encode_kept
from peftkit.data.formats import Example, detect_format, to_example
from peftkit.data.sources import read_source
from peftkit.data.spec import DataSource, DataSpec
from peftkit.data.split import check_supervised, hold_out, split_eval
from peftkit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PreparedData:
    train: Sequence[EncodedRow]
    """A list, or (from the data cache) a memory-mapped `EncodedRows` view."""
    eval: Sequence[EncodedRow]
    audits: list[SplitAudit]
    chat_template: ChatTemplate
    stop_tokens: list[str]
    """End-of-turn tokens that training supervised; generation must stop on them."""
    reference: Sequence[EncodedRow] = field(default_factory=list)
    """General-text rows scored on every token for the forgetting report (`data.reference`)."""
    cache_dir: str | None = None
    """The data cache folder the rows are mapped from (None: encoded in memory)."""
    system_turns: list[str] = field(default_factory=list)
    """The train and eval chats' leading system turns ("" = none), up to two distinct: one
    value = every chat was rendered with it (`models.manifest.training_prompt`)."""


def prepare_data(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Read, normalise, split, encode and audit the data. Raises `DataError` on anything unusable.

    With `data.cache` (default) the rows come from memory-mapped Arrow files in peftkit's cache,
    built by several processes on first use (`peftkit.data.cache`); otherwise they are encoded
    in memory here. Both give the same rows, in the same order, with the same masks and audit."""
    template = resolve_chat_template(tokenizer, spec.chat_template)
    key = data_key(spec, tokenizer, template.template, seed) if spec.cache else None
    if key is None:
        return _prepare_in_memory(spec, tokenizer, seed, template)
    return mapped_data(build.build_once(spec, tokenizer, key, seed), template)[0]


def mapped_data(
    folder: Path, template: ChatTemplate, row_type: type[EncodedRow] = EncodedRow
) -> tuple[PreparedData, dict[str, Any]]:
    """The data of a data cache folder, its rows memory-mapped, and the folder's metadata
    (stop tokens, class names, ...)."""
    rows, audits, meta = store.load(folder, row_type)
    data = PreparedData(
        rows["train"],
        rows.get("eval", []),
        audits,
        template,
        meta.get("stop_tokens", []),
        rows.get("reference", []),
        cache_dir=str(folder),
        system_turns=meta.get("system_turns", []),
    )
    return data, meta


def _prepare_in_memory(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, template: ChatTemplate
) -> PreparedData:
    train_examples = _read_examples(
        spec.train, spec.system_prompt, lambda s: s.task_name, spec.tools
    )
    eval_examples = _read_examples(spec.eval, spec.system_prompt, spec.eval_task, spec.tools)
    train_examples, eval_examples = split_eval(train_examples, eval_examples, spec, seed)
    encoder = Encoder(tokenizer, spec.loss_on, spec.reasoning, spec.chat_template_kwargs)
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
    return PreparedData(
        train,
        evals,
        audits,
        template,
        sorted(encoder.stop_tokens),
        reference,
        system_turns=sorted(encoder.system_turns),
    )


Tagged = tuple[str, Example]
"""An example with the task it belongs to."""


def held_out_chats(spec: DataSpec, seed: int, n: int) -> list[list[dict[str, str]]]:
    """Up to `n` held-out conversations as a client sends them: each chat's turns before its
    first assistant turn, without the recipe's system prompt (the rows' own system turns stay).
    From the eval data, else the held-out share of train, else the last train rows (as the
    export's fidelity check picks its rows)."""
    if spec.eval:
        examples = _read_examples(spec.eval, None, spec.eval_task)
    else:
        train = _read_examples(spec.train, None, lambda s: s.task_name)
        fraction = spec.eval_fraction
        examples = hold_out(train, fraction, seed)[1] if fraction > 0 else train[::-1]
    chats = []
    for _, example in examples:
        roles = [m["role"] for m in example.messages or []]
        if "assistant" in roles and roles.index("assistant") > 0:
            chats.append(example.messages[: roles.index("assistant")])
        if len(chats) == n:
            break
    return chats


def _read_examples(
    sources: list[DataSource],
    system_prompt: str | None,
    task_of: Callable[[DataSource], str],
    tools: list[dict[str, Any]] | None = None,
) -> list[Tagged]:
    examples: list[Tagged] = []
    for source in sources:
        rows = read_source(source)
        if not rows:
            raise DataError(f"{source.path}: the dataset is empty")
        fmt = source.format if source.format != "auto" else detect_format(rows[0])
        task = task_of(source)
        examples += [(task, to_example(row, fmt, system_prompt, tools)) for row in rows]
    return examples


def _encode_split(
    split: str, examples: list[Tagged], encoder: Encoder, spec: DataSpec
) -> tuple[list[EncodedRow], SplitAudit]:
    audit = SplitAudit(split, rows_read=len(examples))
    rows = []
    for task, example in examples:
        status, row = encode_kept(encoder, example, task, spec.max_length, spec.truncation)
        if status == TOO_LONG:
            audit.rows_dropped_too_long += 1
        elif status == UNSUPERVISED:
            audit.add_unsupervised(row)
        else:
            audit.add_kept(row)
            rows.append(row)
    check_supervised(split, audit)
    return rows, audit
