"""Prompt data for reinforcement learning: rows of a `prompt` and any other columns.

Accepted rows (TRL's GRPO layout):
  {"prompt": "...", "answer": "...", ...}             a string prompt, continued as plain text
  {"prompt": [{"role": "user", "content": ...}], ...}  a conversation, continued as the
                                                       assistant's next turn (chat template)
  {"messages": [..., {"role": "assistant", "content": ...}]}
                                                       a chat row: the turns before the last
                                                       assistant turn are the prompt, that turn's
                                                       content the `answer` column (so SFT data
                                                       serves GRPO unchanged)
Every other field is a column handed to the reward functions (`answer` above). The prompt is
encoded exactly as supervised fine-tuning encodes the prompt part of a row (same chat template,
same `data.system_prompt`), so generation continues from the tokens training would condition on.

When a row has a reference answer (the column a metric reward scores against, `answer` by default)
its `scored` row holds prompt + reference with the reference supervised: what generation-based
evaluation cuts and scores, and what the export's fidelity check runs the model on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from peftkit.data.audit import SplitAudit, audit_record, render_mask
from peftkit.data.chat import resolve_chat_template
from peftkit.data.encode import IGNORE, EncodedRow, Encoder
from peftkit.data.formats import ROLES, Example, messages_of
from peftkit.data.pipeline import PreparedData
from peftkit.data.sources import RawRow, read_source
from peftkit.data.split import split_eval
from peftkit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from peftkit.data.spec import DataSource, DataSpec


@dataclass
class PromptRow:
    """One prompt to roll out: its token ids, the reward functions' view of it, its columns."""

    prompt_ids: np.ndarray  # (prompt tokens,) int64
    prompt: Any
    """The prompt as the data gave it (a string, or the turns, system prompt included): the
    `prompts` argument of reward functions."""
    columns: dict[str, Any]
    origin: str
    conversational: bool
    scored: EncodedRow = field(repr=False)
    """Prompt + reference answer (supervised), or the prompt alone with every token scored."""
    task: str = ""

    @property
    def input_ids(self) -> np.ndarray:
        """The prompt's tokens (what length grouping and evaluation order rows by)."""
        return self.prompt_ids


def _reference_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _parse(row: RawRow, system_prompt: str | None, reference: str) -> tuple[Example, Any, dict]:
    data, origin = row.data, row.origin
    if "prompt" not in data and "messages" in data:
        data = _from_chat(data, origin)
    if "prompt" not in data:
        raise DataError(
            f"{origin}: missing 'prompt'; a reinforcement-learning row has a prompt (a string or "
            f"a list of turns) and any columns the rewards read (got keys {sorted(data)})"
        )
    columns = {k: v for k, v in data.items() if k != "prompt"}
    answer = _reference_text(columns.get(reference)) or ""
    prompt = data["prompt"]
    try:
        if isinstance(prompt, str):
            return Example(origin, prompt=prompt, completion=answer), prompt, columns
        turns = messages_of(prompt, {r: r for r in ROLES})
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{origin}: not a valid prompt: {e}") from None
    if turns[-1]["role"] == "assistant":
        raise DataError(
            f"{origin}: the prompt ends with an assistant turn; it should end where the model "
            "answers (a user turn)"
        )
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    example = Example(origin, messages=[*turns, {"role": "assistant", "content": answer}])
    return example, turns, columns


def _from_chat(data: dict, origin: str) -> dict:
    try:
        turns = messages_of(data["messages"], {r: r for r in ROLES})
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{origin}: not a valid messages row: {e}") from None
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise DataError(
            f"{origin}: a messages row as a prompt needs an assistant turn last (its answer)"
        )
    rest = {k: v for k, v in data.items() if k != "messages"}
    return {"prompt": turns[:-1], "answer": turns[-1]["content"], **rest}


def _encode(
    raw: tuple[Example, Any, dict], encoder: Encoder, reference: str, max_length: int
) -> PromptRow | None:
    example, prompt, columns = raw
    row = encoder.encode(example)
    supervised = np.flatnonzero(row.labels != IGNORE)
    start = int(supervised[0]) if supervised.size else len(row.input_ids)
    if start == 0 or start > max_length:
        return None
    has_reference = _reference_text(columns.get(reference)) is not None
    scored = (
        row
        if has_reference and len(row.input_ids) <= max_length
        else EncodedRow(row.input_ids[:start], row.input_ids[:start].copy(), row.origin)
    )
    return PromptRow(
        row.input_ids[:start].copy(),
        prompt,
        columns,
        example.origin,
        example.messages is not None,
        scored,
    )


def prepare_prompt_data(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, reference: str = "answer"
) -> PreparedData:
    """Read, check, split and encode prompt rows; `reference` is the column holding each row's
    reference answer, if any. Raises `DataError` naming the file and line of a bad row."""
    template = resolve_chat_template(tokenizer, spec.chat_template)
    train = _read(spec.train, spec.system_prompt, reference)
    evals = _read(spec.eval, spec.system_prompt, reference)
    train, evals = split_eval(train, evals, spec, seed)
    encoder = Encoder(tokenizer, "completion")
    audits, splits = [], {}
    for split, raws in (("train", train), ("eval", evals)):
        if not raws:
            splits[split] = []
            continue
        audit = SplitAudit(split, rows_read=len(raws))
        rows = []
        for raw in raws:
            row = _encode(raw, encoder, reference, spec.max_length)
            if row is None:
                audit.rows_dropped_too_long += 1
                continue
            audit.rows_kept += 1
            audit.tokens += len(row.prompt_ids)
            audit.max_row_tokens = max(audit.max_row_tokens, len(row.prompt_ids))
            rows.append(row)
        if not rows:
            raise DataError(
                f"no {split} prompt is shorter than data.max_length {spec.max_length} "
                f"({audit.rows_read} read); raise data.max_length"
            )
        audits.append(audit)
        splits[split] = rows
    return PreparedData(
        splits["train"],
        splits["eval"],
        audits,
        template,
        sorted(encoder.stop_tokens),
        system_turns=sorted(encoder.system_turns),
    )


def _read(sources: list[DataSource], system_prompt: str | None, reference: str) -> list[tuple]:
    out = []
    for source in sources:
        rows = read_source(source)
        if not rows:
            raise DataError(f"{source.path}: the dataset is empty")
        out += [_parse(row, system_prompt, reference) for row in rows]
    return out


def prompt_audit_lines(data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The data audit of a reinforcement-learning run: counts, template, the first prompt as the
    model sees it (nothing is supervised: the model's own completions are scored by rewards)."""
    lines = ["data (prompts to roll out; completions are scored by the rewards):"]
    for audit in data.audits:
        lines.append(
            f"  {audit.split}: {audit.rows_kept} of {audit.rows_read} prompts kept "
            f"({audit.rows_dropped_too_long} longer than data.max_length), "
            f"{audit.tokens:,} prompt tokens, longest {audit.max_row_tokens}"
        )
    lines.append(
        f"  chat template: {data.chat_template.source}; completions end at: "
        f"{', '.join(data.stop_tokens)}"
    )
    first = data.train[0]
    lines.append(
        "  first prompt (its reference answer, if any, in ⟦⟧: what evaluation compares with): "
        + render_mask(first.scored, tokenizer)
    )
    columns = sorted(first.columns)
    lines.append(f"  columns passed to the rewards: {', '.join(columns) if columns else 'none'}")
    return lines


def prompt_audit_record(data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> dict:
    """data_audit.json of a reinforcement-learning run."""
    shown = [("prompt + reference", row.scored) for row in data.train[:2]]
    return audit_record(data, tokenizer, "causal_lm", None, shown=shown)
