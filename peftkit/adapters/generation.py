"""Batched generation where each row may use its own adapter, with per-row streaming and limits.

One `model.generate` call serves a batch of rows: prompts are left-padded, rows whose adapters
differ go through peft's mixed-adapter path (`adapter_names=[...]`: each LoRA layer applies each
row's own low-rank update to that row only), and a streamer hands every new token to its row.
A row stops at its own token limit, at a stop token, or when its `cancelled()` says its client is
gone; finished rows are padded, and `generate` ends as soon as every row is finished.

Greedy rows (temperature 0) go through this same call rather than `models.greedy`: serving
streams each row's tokens, stops rows one by one and routes rows to their own adapters, which
`greedy_generate`'s one-shot call does not; the prompts are padded by the same `left_pad`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from peftkit.models.greedy import left_pad


class SamplingOptions(BaseModel):
    """How to pick tokens. temperature 0 = greedy (deterministic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_new_tokens: int = Field(default=128, gt=0)
    """Most tokens generated per answer."""
    temperature: float = Field(default=0.0, ge=0, le=5)
    """0 = greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int = Field(default=0, ge=0)
    """0 = no top-k cut."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple:
        """Rows can share one generate call when these agree (token limits may differ)."""
        return (self.greedy, self.temperature, self.top_p, self.top_k)


@dataclass
class Row:
    """One prompt to continue: its token ids, the adapter to use (None: the base model), options."""

    input_ids: list[int]
    adapter: str | None
    options: SamplingOptions
    stop_ids: set[int]
    """Token ids that end this row's answer (a batch stops each row on any row's stop ids)."""
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of text as it is generated (streaming)."""
    cancelled: Callable[[], bool] | None = None
    """True once nobody wants the answer any more (the client went away): the row stops."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    """'stop' (a stop token), 'length' (the token limit) or 'cancelled' (see `Row.cancelled`)."""


@dataclass
class _RowState:
    row: Row
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    done: bool = False
    stopped: bool = False
    cancelled: bool = False

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else "cancelled" if self.cancelled else "length"


class _RowStreamer(BaseStreamer):
    """Receives each step's new tokens for the whole batch and routes them to their rows."""

    def __init__(
        self, states: list[_RowState], tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]
    ) -> None:
        self.states = states
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids  # generate ends a row on any of them, so the row ends here too
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first sends the prompt ids
            self.prompt_seen = True
            return
        for state, token in zip(self.states, value.reshape(-1).tolist()):
            if state.done:
                continue
            if token in self.stop_ids:
                state.done = state.stopped = True
                continue
            state.tokens.append(token)
            if len(state.tokens) >= state.row.options.max_new_tokens:
                state.done = True
            if state.row.on_text is not None:
                self._emit(state, final=state.done)

    def end(self) -> None:
        for state in self.states:
            if state.row.on_text is not None:
                self._emit(state, final=True)

    def _emit(self, state: _RowState, final: bool) -> None:
        text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest of it
        if len(text) > len(state.emitted) and text.startswith(state.emitted):
            state.row.on_text(text[len(state.emitted) :])
            state.emitted = text


class _RowsFinished(StoppingCriteria):
    """Marks each row finished once it is done or cancelled, so `generate` stops feeding a row
    whose client has gone, and ends when no row is left."""

    def __init__(self, states: list[_RowState]) -> None:
        self.states = states

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        for state in self.states:
            if not state.done and state.row.cancelled is not None and state.row.cancelled():
                state.done = state.cancelled = True
        return torch.tensor([s.done for s in self.states], device=input_ids.device)


@torch.no_grad()
def generate_rows(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    adapter_names: list[str] | None,
) -> list[Completion]:
    """Generate for rows that share sampling settings (see `SamplingOptions.batch_key`).

    Args:
        adapter_names: one peft adapter name per row ("__base__" for none) for a mixed batch, or
            None to run every row through the model's active adapter.
    """
    options = rows[0].options
    if any(r.options.batch_key() != options.batch_key() for r in rows):
        raise ValueError("rows of one generate call must share temperature, top_p and top_k")
    device = next(p.device for p in model.parameters())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad([r.input_ids for r in rows], pad)
    stop_ids = sorted(set().union(*(r.stop_ids for r in rows)))
    config = GenerationConfig(
        max_new_tokens=max(r.options.max_new_tokens for r in rows),
        do_sample=not options.greedy,
        temperature=options.temperature if not options.greedy else None,
        top_p=options.top_p if not options.greedy else None,
        top_k=options.top_k if not options.greedy else None,
        eos_token_id=stop_ids,
        pad_token_id=pad,
        use_cache=True,
    )
    states = [_RowState(r) for r in rows]
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    was_training = model.training
    model.eval()
    try:
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            streamer=_RowStreamer(states, tokenizer, set(stop_ids)),
            stopping_criteria=StoppingCriteriaList([_RowsFinished(states)]),
            **extra,
        )
    finally:
        model.train(was_training)
    return [
        Completion(
            text=tokenizer.decode(s.tokens, skip_special_tokens=True),
            token_ids=s.tokens,
            prompt_tokens=len(s.row.input_ids),
            finish_reason=s.finish_reason,
        )
        for s in states
    ]
