"""The batched encoder of the data cache gives, id for id and label for label, the rows of a
reference encoder that uses only the tokenizer's public calls, one row at a time.

The reference is the encoder as it was before rendering and tokenization were batched: every
prefix of a chat rendered with `apply_chat_template`, every row tokenized alone with
`return_offsets_mapping`, each token labelled by a loop over its character offsets, each row
truncated or dropped by itself, and each turn's end found by the end-of-turn search peftkit
used before it located turns by their own text (`close_turn` below): nothing is shared with the
code under test.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from peftkit.data.chat import resolve_chat_template
from peftkit.data.encode import IGNORE
from peftkit.data.formats import detect_format, to_example
from peftkit.data.pipeline import prepare_data
from peftkit.data.sources import RawRow
from peftkit.recipe.schema import DataSpec
from tests.conftest import write_jsonl

WORDS = "the cat sat on a mat, café naïve 日本語 🙂 2 + 3 = 5 hello world! Tell me why".split()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


def varied_rows(n: int, seed: int) -> list[dict]:
    """Chats of 0-5 turns, with and without system prompts, empty and padded answers, unicode,
    long rows (past max_length) and rows without an answer; and a few non-chat formats."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows: list[dict] = []
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": words(1, 6)})
        for _ in range(rng.randint(0 if i % 11 == 0 else 1, 5)):
            messages.append({"role": "user", "content": words(1, 12)})
            answer = rng.choice(["", f"  {words(1, 4)}\n", words(1, 60 if i % 7 == 0 else 15)])
            messages.append({"role": "assistant", "content": answer})
        if not messages or (messages[-1]["role"] != "user" and i % 11 == 0):
            messages.append({"role": "user", "content": words(1, 3)})  # no answer at all
        rows.append({"messages": messages})
    return rows


class ReferenceEncoder:
    """One row at a time, through the tokenizer's public API only."""

    def __init__(self, tokenizer, loss_on: str) -> None:
        self.tokenizer, self.loss_on = tokenizer, loss_on
        specials = {t for t in tokenizer.all_special_tokens if t}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        alternation = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self.end_of_turn = re.compile(rf"\s*({alternation})")

    def close_turn(self, text: str, start: int, end: int, content: str):
        """Turn [start, end) ends after the end-of-turn token that follows its content (an
        empty answer: its start), or gets the EOS inserted there when none does."""
        segment = text[start:end]
        needle = content.strip()
        found = segment.rfind(needle) if needle else -1
        if found >= 0:
            content_end = start + found + len(needle)
        elif not needle:  # an empty answer: the turn is its end-of-turn token alone
            content_end = start
        else:
            content_end = end - (len(segment) - len(segment.rstrip()))
        match = self.end_of_turn.match(text, content_end, end)
        if match:
            return text, (start, match.end()), match.group(1)
        eos = self.tokenizer.eos_token
        return text[:content_end] + eos + text[content_end:], (start, content_end + len(eos)), eos

    def _render(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def encode(self, example) -> tuple[np.ndarray, np.ndarray]:
        if example.messages is not None:
            messages = example.messages
            text = self._render(messages)
            turns = []
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    before = self._render(messages[:i], add_generation_prompt=True) if i else ""
                    through = self._render(messages[: i + 1])
                    turns.append((len(before), len(through), m["content"]))
            spans, shift = [], 0
            for start, end, content in turns:
                length = len(text)
                text, span, _ = self.close_turn(text, start + shift, end + shift, content)
                shift += len(text) - length
                spans.append(span)
            if self.loss_on == "all":
                spans = [(0, len(text))]
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        else:
            prompt = "" if example.text is not None else example.prompt
            text = prompt + (example.text if example.text is not None else example.completion)
            start = 0 if example.text is not None or self.loss_on == "all" else len(prompt)
            spans = [(start, len(text) + 1)]
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
            if not ids or ids[-1] != self.tokenizer.eos_token_id:
                ids.append(self.tokenizer.eos_token_id)
                offsets.append((len(text), len(text) + 1))
        labels = [
            token if any(s < hi and e > lo for lo, hi in spans) else IGNORE
            for token, (s, e) in zip(ids, offsets)
        ]
        return np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64)


def reference_rows(files: dict[str, list[dict]], tokenizer, spec: DataSpec):
    """(kept rows as (origin, ids, labels, truncated), dropped as too long, unsupervised)."""
    encoder = ReferenceEncoder(tokenizer, spec.loss_on)
    kept, too_long, unsupervised = [], 0, 0
    raws = [
        RawRow(data, f"{path} line {line}")
        for path, rows in files.items()
        for line, data in enumerate(rows, start=1)
    ]
    for raw in raws:
        fmt = detect_format(RawRow(files[raw.origin.rsplit(" line ", 1)[0]][0], raw.origin))
        ids, labels = encoder.encode(to_example(raw, fmt, spec.system_prompt))
        if len(ids) > spec.max_length and spec.truncation == "drop":
            too_long += 1
            continue
        truncated = len(ids) > spec.max_length
        ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        if not (labels[1:] != IGNORE).any():
            unsupervised += 1
            continue
        kept.append((raw.origin, ids, labels, truncated))
    return kept, too_long, unsupervised


@pytest.mark.parametrize(
    "template, settings",
    [
        ("chatml", {"num_proc": 2, "max_length": 64}),
        ("chatml", {"loss_on": "all", "max_length": 48, "system_prompt": "Be terse."}),
        ("llama3", {"truncation": "drop", "max_length": 96, "system_prompt": "Answer."}),
        ("plain", {"max_length": 80}),  # no end-of-turn token: EOS inserted after answers
        ("none", {"truncation": "drop", "max_length": 72, "num_proc": 2}),  # fallback template
    ],
)
def test_cached_rows_equal_the_reference_encoder(
    template, settings, tokenizers_by_template, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_by_template[template])
    files = {
        str(tmp_path / "chats.jsonl"): varied_rows(120, seed=len(template)),
        str(tmp_path / "completions.jsonl"): [
            {"prompt": "Q: café?\nA:", "completion": " 日本語 " * (i + 1)} for i in range(0, 40, 4)
        ],
        str(tmp_path / "text.jsonl"): [{"text": " ".join(WORDS[: i + 3])} for i in range(6)],
    }
    for path, rows in files.items():
        write_jsonl(Path(path), rows)
    spec = DataSpec(train=list(files), **settings)
    resolve_chat_template(tokenizer, spec.chat_template)
    kept, too_long, unsupervised = reference_rows(files, tokenizer, spec)

    data = prepare_data(spec, tokenizer, seed=0)

    assert data.cache_dir is not None
    audit = data.audits[0]
    assert (audit.rows_dropped_too_long, audit.rows_without_supervised_tokens) == (
        too_long,
        unsupervised,
    )
    assert audit.rows_truncated == sum(t for *_, t in kept)
    assert too_long + unsupervised + audit.rows_truncated > 0  # the edge cases are there
    assert len(data.train) == len(kept)
    for (origin, ids, labels, truncated), row in zip(kept, data.train):
        assert (row.origin, row.truncated) == (origin, truncated)
        np.testing.assert_array_equal(row.input_ids, ids, err_msg=origin)
        np.testing.assert_array_equal(row.labels, labels, err_msg=origin)
