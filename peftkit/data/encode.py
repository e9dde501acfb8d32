"""Turn canonical examples into token ids and labels (-100 = no loss) for causal-LM training.

Labels are aligned with input ids (label[i] = input_ids[i] where supervised); the loss shifts them.
Masks come from character spans mapped through the tokenizer's offsets, never from pad ids, so an
EOS that doubles as the pad token still carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from transformers import PreTrainedTokenizerBase

from peftkit.data.chat import ChatRenderer
from peftkit.data.formats import Example

IGNORE = -100


@dataclass
class EncodedRow:
    input_ids: np.ndarray  # (seq,) int64
    labels: np.ndarray  # (seq,) int64, IGNORE where no loss
    origin: str
    truncated: bool = False
    task: str = ""
    """The task the row belongs to (`DataSource.task_name`); set by the data pipeline."""

    @property
    def n_supervised(self) -> int:
        # Position 0 is never predicted, so its label never counts.
        return int((self.labels[1:] != IGNORE).sum())


@dataclass
class RenderedText:
    """An example as the text to tokenize and the character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]
    origin: str
    chat: bool
    """Chats carry their special tokens in the text; plain text gets the tokenizer's own (BOS)
    and an EOS appended."""


class Encoder:
    """Encodes examples with one tokenizer, chat renderer and loss policy.

    `encode` does one example; `render` then `tokenize` do a batch (one tokenizer call), with the
    same result row for row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, loss_on: str) -> None:
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.renderer = ChatRenderer(tokenizer)
        self.stop_tokens: set[str] = set()

    def encode(self, example: Example, first_turn: int = 0) -> EncodedRow:
        """Token ids and labels of one example; for conversations, assistant turns before
        `first_turn` (0-based among assistant turns) carry no loss (preference answers)."""
        return self.tokenize([self.render(example, first_turn)])[0]

    def render(self, example: Example, first_turn: int = 0) -> RenderedText:
        if example.messages is not None:
            chat = self.renderer.render(example.messages, example.origin)
            self.stop_tokens |= chat.stop_tokens
            spans = (
                [(0, len(chat.text))]
                if self.loss_on == "all"
                else chat.assistant_spans[first_turn:]
            )
            return RenderedText(chat.text, spans, example.origin, chat=True)
        if example.text is not None:
            prompt, completion, supervise_prompt = "", example.text, True
        else:
            prompt, completion = example.prompt or "", example.completion or ""
            supervise_prompt = self.loss_on == "all"
        self.stop_tokens.add(self.tokenizer.eos_token)
        text = prompt + completion
        # The span runs to a virtual character after the text: the appended EOS.
        start = 0 if supervise_prompt else len(prompt)
        return RenderedText(text, [(start, len(text) + 1)], example.origin, chat=False)

    def tokenize(self, texts: list[RenderedText]) -> list[EncodedRow]:
        rows: list[EncodedRow | None] = [None] * len(texts)
        for chat in (True, False):
            which = [i for i, t in enumerate(texts) if t.chat == chat]
            if not which:
                continue
            encoded = self._ids_and_offsets([texts[i].text for i in which], not chat)
            for (ids, offsets), i in zip(encoded, which):
                if not chat:
                    ids, offsets = self._with_eos(ids, offsets, len(texts[i].text))
                ids_arr = np.asarray(ids, dtype=np.int64)
                labels = _labels_from_spans(ids_arr, offsets, texts[i].spans)
                rows[i] = EncodedRow(ids_arr, labels, texts[i].origin)
        return rows  # type: ignore[return-value]

    def _ids_and_offsets(
        self, texts: list[str], add_special_tokens: bool
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and character offsets of each text, as `tokenizer(texts, ...)` gives them.
        A fast tokenizer without truncation or padding set is called directly (the same call
        transformers makes, without its per-row conversion of every output field)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens
            == getattr(self.tokenizer, "split_special_tokens", False)
        ):
            return [
                (e.ids, e.offsets)
                for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            ]
        enc = self.tokenizer(
            texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def _with_eos(
        self, ids: list[int], offsets: list[tuple[int, int]], n_chars: int
    ) -> tuple[list[int], list[tuple[int, int]]]:
        eos = self.tokenizer.eos_token_id
        if ids and ids[-1] == eos:
            return ids, offsets
        return [*ids, eos], [*offsets, (n_chars, n_chars + 1)]


def _labels_from_spans(
    ids: np.ndarray, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> np.ndarray:
    """Label each token whose characters overlap a supervised span (a token straddling the
    prompt/answer boundary is supervised: the answer needs it)."""
    labels = np.full_like(ids, IGNORE)
    if not spans:
        return labels
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (seq, 2): [start, end)
    starts, ends = bounds[:, 0], bounds[:, 1]
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask |= (starts < hi) & (ends > lo)
    labels[mask] = ids[mask]
    return labels


KEPT, TOO_LONG, UNSUPERVISED = 0, 1, 2
"""What became of an encoded row: kept, dropped as too long (`truncation: drop`), or dropped
because no token carries loss."""


def encode_kept(
    encoder: Encoder, example: Example, task: str, max_length: int, truncation: str
) -> tuple[int, EncodedRow]:
    """Encode one example and decide its fate (`KEPT`, `TOO_LONG`, `UNSUPERVISED`); the row is
    truncated to `max_length` unless dropped."""
    return settle(encoder.encode(example), task, max_length, truncation)


def settle(row: EncodedRow, task: str, max_length: int, truncation: str) -> tuple[int, EncodedRow]:
    """Tag an encoded row with its task and decide its fate (see `encode_kept`)."""
    row.task = task
    if len(row.input_ids) > max_length and truncation == "drop":
        return TOO_LONG, row
    row = truncate(row, max_length)
    return (KEPT if row.n_supervised else UNSUPERVISED), row


def row_lengths(rows) -> np.ndarray:
    """Token count of every row (a column read where the rows are an Arrow view)."""
    own = getattr(rows, "lengths", None)
    return own if own is not None else np.array([len(r.input_ids) for r in rows], dtype=np.int64)


def row_tasks(rows) -> np.ndarray:
    """Task name of every row (a column read where the rows are an Arrow view)."""
    own = getattr(rows, "tasks", None)
    return own if own is not None else np.array([r.task for r in rows], dtype=object)


def truncate(row: EncodedRow, max_length: int) -> EncodedRow:
    """Keep the first `max_length` tokens (the rest is cut, and the row is marked truncated)."""
    if len(row.input_ids) <= max_length:
        return row
    return replace(
        row, input_ids=row.input_ids[:max_length], labels=row.labels[:max_length], truncated=True
    )
