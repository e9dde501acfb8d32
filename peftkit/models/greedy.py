"""Greedy continuations of a batch of prompts: the one place peftkit asks a model for its
deterministic answers (generated-answer evaluation, before/after samples, the export fidelity
gate; serving's batches pad their prompts with `left_pad` too).

Prompts of different lengths are left-padded so that every row's next token is at the same
column; the attention mask hides the padding and transformers derives each row's positions from
it, so a row's answer does not depend on the rows it shares a batch with (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest prompt): each prompt right-aligned after
    `pad_id` padding, which the mask (0) hides."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    keep_stop: bool = False,
) -> list[list[int]]:
    """Greedy continuations (`model.generate(do_sample=False)`) of `prompts`, one batch, left
    padded: each row's new tokens up to its first stop token (excluded, or kept with
    `keep_stop`), at most `max_new_tokens`. The model's train/eval mode is the caller's."""
    device = next(p.device for p in model.parameters())
    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    stops = set(stop_ids)
    answers = []
    for row in out[:, ids.shape[1] :].tolist():  # (batch, new tokens)
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(row[: cut + 1 if keep_stop and cut < len(row) else cut])
    return answers
