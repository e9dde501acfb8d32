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


class Encoder:
    """Encodes examples with one tokenizer, chat renderer and loss policy."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, loss_on: str) -> None:
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.renderer = ChatRenderer(tokenizer)
        self.stop_tokens: set[str] = set()

    def encode(self, example: Example, first_turn: int = 0) -> EncodedRow:
        """Token ids and labels of one example; for conversations, assistant turns before
        `first_turn` (0-based among assistant turns) carry no loss (preference answers)."""
        if example.messages is not None:
            return self._encode_chat(example, first_turn)
        if example.text is not None:
            return self._encode_plain("", example.text, example.origin, supervise_prompt=True)
        return self._encode_plain(
            example.prompt or "",
            example.completion or "",
            example.origin,
            supervise_prompt=self.loss_on == "all",
        )

    def _encode_chat(self, example: Example, first_turn: int = 0) -> EncodedRow:
        chat = self.renderer.render(example.messages, example.origin)
        self.stop_tokens |= chat.stop_tokens
        spans = (
            [(0, len(chat.text))] if self.loss_on == "all" else chat.assistant_spans[first_turn:]
        )
        enc = self.tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        return EncodedRow(
            ids, _labels_from_spans(ids, enc["offset_mapping"], spans), example.origin
        )

    def _encode_plain(
        self, prompt: str, completion: str, origin: str, supervise_prompt: bool
    ) -> EncodedRow:
        text = prompt + completion
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        eos = self.tokenizer.eos_token_id
        if not ids or ids[-1] != eos:
            ids.append(eos)
            offsets.append((len(text), len(text) + 1))  # a virtual character after the text
        self.stop_tokens.add(self.tokenizer.eos_token)
        start = 0 if supervise_prompt else len(prompt)
        ids_arr = np.asarray(ids, dtype=np.int64)
        return EncodedRow(
            ids_arr, _labels_from_spans(ids_arr, offsets, [(start, len(text) + 1)]), origin
        )


def _labels_from_spans(
    ids: np.ndarray, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> np.ndarray:
    """Label each token whose characters overlap a supervised span (a token straddling the
    prompt/answer boundary is supervised: the answer needs it)."""
    labels = np.full_like(ids, IGNORE)
    if not spans:
        return labels
    starts = np.asarray([s for s, _ in offsets])
    ends = np.asarray([e for _, e in offsets])
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask |= (starts < hi) & (ends > lo)
    labels[mask] = ids[mask]
    return labels


def truncate(row: EncodedRow, max_length: int) -> EncodedRow:
    """Keep the first `max_length` tokens (the rest is cut, and the row is marked truncated)."""
    if len(row.input_ids) <= max_length:
        return row
    return replace(
        row, input_ids=row.input_ids[:max_length], labels=row.labels[:max_length], truncated=True
    )
