"""The loss-mask audit: what the data turned into, printed before training so nothing is silent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from peftkit.data.encode import IGNORE, EncodedRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class SplitAudit:
    split: str
    rows_read: int = 0
    rows_kept: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    rows_truncated: int = 0
    rows_dropped_too_long: int = 0
    rows_without_supervised_tokens: int = 0
    max_row_tokens: int = 0
    examples_without_supervision: list[str] = field(default_factory=list)

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def add_kept(self, row: EncodedRow) -> None:
        self.rows_kept += 1
        self.tokens += len(row.input_ids)
        self.supervised_tokens += row.n_supervised
        self.rows_truncated += row.truncated
        self.max_row_tokens = max(self.max_row_tokens, len(row.input_ids))

    def add_unsupervised(self, row: EncodedRow) -> None:
        self.rows_without_supervised_tokens += 1
        if len(self.examples_without_supervision) < 3:
            self.examples_without_supervision.append(row.origin)

    def to_dict(self) -> dict:
        return {**asdict(self), "supervised_share": round(self.supervised_share, 4)}

    def lines(self) -> list[str]:
        lines = [
            f"{self.split}: {self.rows_kept:,} rows kept of {self.rows_read:,} read; "
            f"{self.tokens:,} tokens, {self.supervised_tokens:,} carry loss ({self.supervised_share:.1%}); "
            f"longest row {self.max_row_tokens:,} tokens",
            f"  truncated: {self.rows_truncated:,}   dropped as too long: {self.rows_dropped_too_long:,}   "
            f"dropped with no supervised tokens: {self.rows_without_supervised_tokens:,}",
        ]
        if self.examples_without_supervision:
            lines.append(f"  e.g. {', '.join(self.examples_without_supervision)}")
        return lines


PART_LABELS = {"reasoning": "reasoning", "tool_call": "tool call", "tool_result": "tool result"}
"""The agent parts of a chat the audit shows apart (`RenderedChat.parts`)."""


def mask_stretches(
    row: EncodedRow, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, bool, str]]:
    """The row's text as (text, supervised, part) stretches: where the loss mask switches on
    and off, and where an agent part (a `PART_LABELS` key; "" = none) starts or ends."""
    kinds = [""] * len(row.input_ids)
    for start, end, kind in row.parts or []:
        kinds[start:end] = [kind] * len(kinds[start:end])
    stretches, current, key = [], [], None
    for token, label, kind in zip(row.input_ids.tolist(), row.labels.tolist(), kinds):
        here = (label != IGNORE, kind)
        if here != key and current:
            stretches.append((tokenizer.decode(current), *key))
            current = []
        key = here
        current.append(token)
    if current:
        stretches.append((tokenizer.decode(current), *key))
    return stretches


def mask_segments(row: EncodedRow, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """The row's text as (text, supervised) stretches: where the loss mask switches on and off
    (split further where an agent part starts or ends)."""
    return [(text, supervised) for text, supervised, _ in mask_stretches(row, tokenizer)]


def render_mask(row: EncodedRow, tokenizer: PreTrainedTokenizerBase, limit: int = 400) -> str:
    """The row's text with supervised stretches in ⟦brackets⟧ and agent parts labelled
    («tool call: ...»), to check the mask by eye."""
    text = "".join(_wrap(t, s, k) for t, s, k in mask_stretches(row, tokenizer))
    return text if len(text) <= limit else text[:limit] + " …"


def _wrap(text: str, supervised: bool | None, kind: str = "") -> str:
    if kind:
        text = f"«{PART_LABELS[kind]}: {text}»"
    return f"⟦{text}⟧" if supervised else text


def audit_lines(data, tokenizer: PreTrainedTokenizerBase, task_type: str, class_names) -> list[str]:
    """The loss-mask audit printed before training: every split's counts, then for causal LMs the
    chat template and stop tokens and the first row with its supervised tokens marked (for task
    heads, the label set). `data` is a `PreparedData`."""
    lines = ["data (loss-mask audit):"]
    lines += ["  " + line for audit in data.audits for line in audit.lines()]
    if task_type != "causal_lm":
        classes = ", ".join(class_names) if class_names else "a number (regression)"
        return [*lines, f"  task head: {task_type}; label = {classes}"]
    return [
        *lines,
        f"  chat template: {data.chat_template.source}; turns end with: "
        f"{', '.join(data.stop_tokens)}",
        "  first row, supervised tokens in ⟦⟧: " + render_mask(data.train[0], tokenizer),
    ]


def audit_record(
    data,
    tokenizer: PreTrainedTokenizerBase,
    task_type: str,
    class_names,
    rows: int = 3,
    shown: list[tuple[str, EncodedRow]] | None = None,
) -> dict:
    """data_audit.json: every split's counts and, for causal LMs, the first train rows as
    (text, supervised) stretches (what report.html highlights). `data` is a `PreparedData`;
    `shown`: the rows to show instead, each with a label after its origin (a pair's chosen and
    rejected answers, a prompt and its reference)."""
    record = {
        "splits": [a.to_dict() for a in data.audits],
        "task_type": task_type,
        "class_names": class_names,
    }
    if task_type == "causal_lm":
        record["chat_template_source"] = data.chat_template.source
        record["stop_tokens"] = data.stop_tokens
        labelled = shown or [("", row) for row in data.train[:rows]]
        record["rows"] = [_audit_row(row, label, tokenizer) for label, row in labelled]
    return record


def _audit_row(row: EncodedRow, label: str, tokenizer: PreTrainedTokenizerBase) -> dict:
    """A shown row: its (text, supervised) segments and, for agent chats, each segment's part
    ("reasoning", "tool_call", "tool_result" or "")."""
    stretches = mask_stretches(row, tokenizer)
    out = {
        "origin": f"{row.origin} ({label})" if label else row.origin,
        "segments": [(text, supervised) for text, supervised, _ in stretches],
    }
    if any(kind for _, _, kind in stretches):
        out["parts"] = [kind for _, _, kind in stretches]
    return out
