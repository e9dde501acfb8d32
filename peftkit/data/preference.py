"""Preference data: {prompt, chosen, rejected} pairs and KTO's {prompt, completion, label} rows.

Accepted rows (one layout per file, told apart by its keys):
  pairs, strings        {"prompt": "...", "chosen": "...", "rejected": "..."}
  pairs, conversations  {"prompt": [messages], "chosen": [assistant turn(s)], "rejected": [...]}
                        or whole conversations sharing the prompt turns (UltraFeedback style):
                        {"chosen": [user, assistant], "rejected": [user, assistant]}
  KTO                   {"prompt": ..., "completion": ..., "label": true|false}
A KTO run also reads pairs (the chosen answer desirable, the rejected one not), as TRL's
`unpair_preference_dataset` does.

Each answer is encoded exactly as supervised fine-tuning encodes a row (same chat template, same
end-of-turn/EOS token, `encode.Encoder`), with labels on every token after the prompt: the answer
turn(s) of a conversation, their end-of-turn token and whatever the template writes after it
(ChatML's newline), or the completion and EOS after a string prompt. That is TRL's completion,
so an answer's log-probability is the one its trainers compute.

With `data.cache` the encoded rows are kept in peftkit's data cache as supervised fine-tuning's are
(keyed by the same contents, plus the row kind), encoded here the first time and read back from
there afterwards (`peftkit prepare` builds it ahead of training).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftkit.data.audit import SplitAudit, audit_record, render_mask
from peftkit.data.cache import store
from peftkit.data.cache.key import data_key
from peftkit.data.chat import ChatTemplate, resolve_chat_template
from peftkit.data.encode import IGNORE, EncodedRow, Encoder, truncate
from peftkit.data.formats import ROLES, Example, messages_of, text_of
from peftkit.data.pipeline import PreparedData
from peftkit.data.sources import RawRow, read_source
from peftkit.data.spec import DataSource, DataSpec
from peftkit.data.split import split_eval
from peftkit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class PreferenceRow:
    """One encoded preference example: a chosen and a rejected answer to the same prompt, or, for
    KTO, one answer (`chosen`) with `desirable` telling whether it is a good one."""

    chosen: EncodedRow
    rejected: EncodedRow | None
    origin: str
    desirable: bool | None = None
    task: str = ""
    ref_logps: tuple[float, float] | None = None
    """objective.precompute_ref: the reference's log-probs of (chosen, rejected) (KTO: (answer, 0))."""

    @property
    def sequences(self) -> list[EncodedRow]:
        return [self.chosen] if self.rejected is None else [self.chosen, self.rejected]

    @property
    def n_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)

    @property
    def length(self) -> int:
        """Tokens of the longest answer: what the row pads to (length grouping)."""
        return max(len(s.input_ids) for s in self.sequences)


@dataclass
class _Raw:
    """A parsed row before encoding: the answers as `Example`s (prompt included)."""

    chosen: Example
    rejected: Example | None
    first_answer_turn: int  # conversations: index of the first supervised assistant turn
    desirable: bool | None
    origin: str


def preference_key(unpaired: bool) -> dict[str, Any]:
    """What decides encoded preference rows besides the data section (part of the cache key)."""
    return {"rows": "preference", "unpaired": unpaired}


def prepare_preference_data(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, unpaired: bool
) -> PreparedData:
    """Read, check, split and encode preference rows. `unpaired` (KTO) turns pairs into two rows.
    Raises `DataError` naming the file and line of a bad row. With `data.cache`, the rows come
    from the data cache (encoded and stored there the first time)."""
    template = resolve_chat_template(tokenizer, spec.chat_template)
    extra = preference_key(unpaired)
    key = data_key(spec, tokenizer, template.template, seed, extra) if spec.cache else None
    if key is None:
        return _prepare_in_memory(spec, tokenizer, seed, unpaired, template)
    folder = store.cache_dir(key)
    if (folder / "meta.json").is_file():
        log.info("encoded data found in %s", folder)
    else:
        write_preference_rows(folder, _prepare_in_memory(spec, tokenizer, seed, unpaired, template))
    return mapped_preference_data(folder, template)


def _prepare_in_memory(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    unpaired: bool,
    template: ChatTemplate,
) -> PreparedData:
    train = _read(spec.train, spec.system_prompt, unpaired)
    evals = _read(spec.eval, spec.system_prompt, unpaired)
    train, evals = split_eval(train, evals, spec, seed)
    encoder = Encoder(tokenizer, "completion")
    train_rows, train_audit = _encode_split("train", train, encoder, spec)
    eval_rows, eval_audit = _encode_split("eval", evals, encoder, spec) if evals else ([], None)
    audits = [train_audit] + ([eval_audit] if eval_audit else [])
    return PreparedData(
        train_rows,
        eval_rows,
        audits,
        template,
        sorted(encoder.stop_tokens),
        system_turns=sorted(encoder.system_turns),
    )


def write_preference_rows(folder: Path, data: PreparedData) -> None:
    """Store encoded preference rows as a data cache folder, atomically: every answer is a row of
    the Arrow table (`store.write_rows`), the chosen ones of a split, then its rejected ones;
    which pair each belongs to, its origin and KTO label go to meta.json."""
    sequences: dict[str, list[EncodedRow]] = {}
    pairs: dict[str, dict[str, list]] = {}
    for split, rows in (("train", data.train), ("eval", data.eval)):
        if split == "eval" and not rows:
            continue
        sequences[f"{split}.chosen"] = [r.chosen for r in rows]
        sequences[f"{split}.rejected"] = [r.rejected for r in rows if r.rejected is not None]
        pairs[split] = {
            "origin": [r.origin for r in rows],
            "desirable": [r.desirable for r in rows],
            "paired": [r.rejected is not None for r in rows],
        }
    store.write_rows(
        folder,
        sequences,
        data.audits,
        "int64",
        rows="preference",
        pairs=pairs,
        stop_tokens=data.stop_tokens,
        system_turns=data.system_turns,
    )


def mapped_preference_data(folder: Path, template: ChatTemplate) -> PreparedData:
    """The preference rows of a data cache folder (`write_preference_rows`), read back: the same
    rows, in the same order, as the encoding that stored them."""
    meta = json.loads((folder / "meta.json").read_text())
    with contextlib.suppress(OSError):  # (a read-only cache is still read)
        (folder / store.USED).touch()
    table = store.read_tables(folder, meta["files"])

    def answers(name: str) -> store.EncodedRows:
        return store.EncodedRows(table, np.load(folder / f"{name}.npy", allow_pickle=False))

    splits: dict[str, list[PreferenceRow]] = {"eval": []}
    for split, p in meta["pairs"].items():
        chosen, rejected = answers(f"{split}.chosen"), iter(answers(f"{split}.rejected"))
        splits[split] = [
            PreferenceRow(chosen[i], next(rejected) if paired else None, origin, desirable)
            for i, (origin, desirable, paired) in enumerate(
                zip(p["origin"], p["desirable"], p["paired"])
            )
        ]
    return PreparedData(
        splits["train"],
        splits["eval"],
        [SplitAudit(**a) for a in meta["audits"].values()],
        template,
        meta["stop_tokens"],
        cache_dir=str(folder),
        system_turns=meta["system_turns"],
    )


def _read(sources: list[DataSource], system_prompt: str | None, unpaired: bool) -> list[_Raw]:
    out: list[_Raw] = []
    for source in sources:
        rows = read_source(source)
        if not rows:
            raise DataError(f"{source.path}: the dataset is empty")
        for row in rows:
            raw = _parse(row, system_prompt)
            if unpaired and raw.rejected is not None:
                out.append(replace(raw, rejected=None, desirable=True))
                out.append(replace(raw, chosen=raw.rejected, rejected=None, desirable=False))
            elif not unpaired and raw.rejected is None:
                raise DataError(
                    f"{row.origin}: a KTO row (prompt, completion, label) in a paired objective; "
                    "pairs need 'chosen' and 'rejected' (or use objective: kto)"
                )
            else:
                out.append(raw)
    return out


def _parse(row: RawRow, system_prompt: str | None) -> _Raw:
    data, origin = row.data, row.origin
    try:
        if "completion" in data or "label" in data:
            return _parse_unpaired(data, origin, system_prompt)
        missing = [k for k in ("chosen", "rejected") if k not in data]
        if missing:
            raise DataError(
                f"{origin}: missing {' and '.join(repr(k) for k in missing)}; a preference row "
                f"has prompt, chosen and rejected (got keys {sorted(data)})"
            )
        prompt, chosen, rejected = data.get("prompt"), data["chosen"], data["rejected"]
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise DataError(f"{origin}: 'chosen' and 'rejected' must both be strings or both lists")
        if isinstance(chosen, str):
            if not isinstance(prompt, str):
                raise DataError(
                    f"{origin}: string answers need a string 'prompt' (got {type(prompt).__name__})"
                )
            if chosen == rejected:
                raise DataError(f"{origin}: 'chosen' and 'rejected' are identical: {chosen[:60]!r}")
            return _Raw(
                Example(origin, prompt=prompt, completion=chosen),
                Example(origin, prompt=prompt, completion=rejected),
                0,
                None,
                origin,
            )
        prompt_turns, chosen_turns, rejected_turns = _conversation_parts(
            prompt, chosen, rejected, origin
        )
        if chosen_turns == rejected_turns:
            raise DataError(
                f"{origin}: 'chosen' and 'rejected' are identical: "
                f"{chosen_turns[-1]['content'][:60]!r}"
            )
        prompt_turns = _with_system(prompt_turns, system_prompt)
        first = sum(m["role"] == "assistant" for m in prompt_turns)
        return _Raw(
            Example(origin, messages=prompt_turns + chosen_turns),
            Example(origin, messages=prompt_turns + rejected_turns),
            first,
            None,
            origin,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{origin}: not a valid preference row: {e}") from None


def _conversation_parts(
    prompt, chosen, rejected, origin: str
) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt turns, chosen answer turns, rejected answer turns) of a conversational pair."""
    roles = {r: r for r in ROLES}
    chosen_msgs = messages_of(chosen, roles)
    rejected_msgs = messages_of(rejected, roles)
    if prompt is not None:  # TRL's layout: the answers are the turns after a separate prompt
        prompt_msgs = messages_of(prompt, roles) if not isinstance(prompt, str) else None
        if prompt_msgs is None:
            raise DataError(f"{origin}: conversational answers need 'prompt' as a list of turns")
        answers = (chosen_msgs, rejected_msgs)
    else:  # whole conversations: the prompt is every turn before the last
        prompt_msgs = chosen_msgs[:-1]
        if rejected_msgs[:-1] != prompt_msgs:
            turn = next(
                (i for i, (a, b) in enumerate(zip(chosen_msgs[:-1], rejected_msgs[:-1])) if a != b),
                min(len(chosen_msgs), len(rejected_msgs)) - 1,
            )
            raise DataError(
                f"{origin}: prompt mismatch: the 'chosen' and 'rejected' conversations differ at "
                f"turn {turn}, before their last (answer) turn; both must share the prompt turns"
            )
        answers = (chosen_msgs[-1:], rejected_msgs[-1:])
    for name, turns in zip(("chosen", "rejected"), answers):
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"{origin}: the '{name}' answer must end with an assistant turn")
    return prompt_msgs, *answers


def _parse_unpaired(data: dict, origin: str, system_prompt: str | None) -> _Raw:
    missing = [k for k in ("prompt", "completion", "label") if k not in data]
    if missing:
        raise DataError(
            f"{origin}: missing {' and '.join(repr(k) for k in missing)}; a KTO row has prompt, "
            "completion and label (true = desirable)"
        )
    label = data["label"]
    if not isinstance(label, bool):
        raise DataError(f"{origin}: 'label' must be true or false, got {label!r}")
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str):
        example = Example(origin, prompt=prompt, completion=text_of(completion, "completion"))
        return _Raw(example, None, 0, label, origin)
    roles = {r: r for r in ROLES}
    prompt_turns = _with_system(messages_of(prompt, roles), system_prompt)
    answer = messages_of(completion, roles)
    if answer[-1]["role"] != "assistant":
        raise DataError(f"{origin}: the 'completion' must end with an assistant turn")
    first = sum(m["role"] == "assistant" for m in prompt_turns)
    return _Raw(Example(origin, messages=prompt_turns + answer), None, first, label, origin)


def _with_system(turns: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not turns or turns[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *turns]
    return turns


def _encode_split(
    split: str, raws: list[_Raw], encoder: Encoder, spec: DataSpec
) -> tuple[list[PreferenceRow], SplitAudit]:
    audit = SplitAudit(split, rows_read=len(raws))
    rows: list[PreferenceRow] = []
    for raw in raws:
        answers = [raw.chosen] + ([raw.rejected] if raw.rejected is not None else [])
        encoded = [
            scored_after_prompt(encoder.encode(a, first_turn=raw.first_answer_turn))
            for a in answers
        ]
        if spec.truncation == "drop" and any(len(e.input_ids) > spec.max_length for e in encoded):
            audit.rows_dropped_too_long += 1
            continue
        encoded = [truncate(e, spec.max_length) for e in encoded]
        if any(e.n_supervised == 0 for e in encoded):
            audit.add_unsupervised(encoded[0])
            continue
        row = PreferenceRow(
            encoded[0], encoded[1] if len(encoded) > 1 else None, raw.origin, raw.desirable
        )
        _count(audit, row)
        rows.append(row)
    if not rows:
        raise DataError(
            f"no {split} preference row has answer tokens left ({audit.rows_read} read, "
            f"{audit.rows_dropped_too_long} too long, {audit.rows_without_supervised_tokens} "
            "cut before their answer); raise data.max_length"
        )
    return rows, audit


def scored_after_prompt(row: EncodedRow) -> EncodedRow:
    """The answer as DPO's y: every token after the prompt carries a label, from the answer's
    first token to the end of the row, so the template's text after the end-of-turn token
    (ChatML's newline after <|im_end|>) is scored too, as TRL's trainers score a completion."""
    supervised = np.flatnonzero(row.labels != IGNORE)
    if supervised.size == 0:
        return row
    labels = row.labels.copy()
    labels[supervised[0] :] = row.input_ids[supervised[0] :]
    return replace(row, labels=labels)


def _count(audit: SplitAudit, row: PreferenceRow) -> None:
    audit.rows_kept += 1
    for seq in row.sequences:
        audit.tokens += len(seq.input_ids)
        audit.supervised_tokens += seq.n_supervised
        audit.max_row_tokens = max(audit.max_row_tokens, len(seq.input_ids))
    audit.rows_truncated += any(seq.truncated for seq in row.sequences)


def preference_audit_lines(data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The loss-mask audit of a preference run: counts, template, and the first pair (or a
    desirable and an undesirable KTO row) with the scored answer tokens in ⟦⟧."""
    lines = ["data (loss-mask audit; a row is a preference pair or a KTO answer):"]
    lines += ["  " + line for audit in data.audits for line in audit.lines()]
    lines.append(
        f"  chat template: {data.chat_template.source}; turns end with: "
        f"{', '.join(data.stop_tokens)}"
    )
    first = data.train[0]
    if first.rejected is not None:
        lines.append("  first pair, chosen:   " + render_mask(first.chosen, tokenizer))
        lines.append("  first pair, rejected: " + render_mask(first.rejected, tokenizer))
        return lines
    for want, name in ((True, "desirable"), (False, "undesirable")):
        row = next((r for r in data.train if r.desirable is want), None)
        if row is not None:
            lines.append(f"  first {name} row: " + render_mask(row.chosen, tokenizer))
    return lines


def preference_audit_record(data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> dict:
    """data_audit.json of a preference run: counts, and the first pair's (or KTO rows') answers
    as (text, scored) stretches, labelled chosen / rejected."""
    first = data.train[0]
    rows = (
        [("chosen", first.chosen), ("rejected", first.rejected)]
        if first.rejected is not None
        else [("desirable" if r.desirable else "undesirable", r.chosen) for r in data.train[:2]]
    )
    return audit_record(data, tokenizer, "causal_lm", None, shown=rows)


def preferred_answers(rows: list[PreferenceRow]) -> list[EncodedRow]:
    """The chosen answers of pairs and the desirable KTO rows, as supervised rows."""
    return [r.chosen for r in rows if r.rejected is not None or r.desirable]
