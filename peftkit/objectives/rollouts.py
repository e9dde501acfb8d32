"""Sampling completions with the live model: a KV-cache loop with one random generator per row.

Each row draws from its own `torch.Generator`, seeded by `row_seed`, so what a row samples does not
depend on which other rows share its batch, on how many processes run, or on the global RNG: a
resumed run and a run on 2 processes draw exactly the completions of the uninterrupted 1-process
run. Prompts are left-padded (position ids follow the attention mask); a row ends at its first
stop token and is padded after it. With `group` > 1 each prompt is prefilled once and its KV cache
repeated to the `group` rows that sample from it (GRPO's completions of one prompt).

This loop is not `models.greedy.greedy_generate`: sampling needs one generator per row (which
`generate` does not offer), and GRPO scores what it drew with the masks this loop returns. With
`greedy=True` (GRPO's held-out evaluation) it picks the same tokens as `greedy_generate`, so the
evaluation sees completions made exactly as training's are (tests/unit/test_greedy.py).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from peftkit import _compat


def row_seed(seed: int, step: int, origin: str, sample: int) -> int:
    """The generator seed of one sampled completion: from the run's seed, the optimizer step, the
    data row (its file name and line, not its folder: the same data anywhere draws the same) and
    the completion's number within its group."""
    place = origin.replace("\\", "/").rsplit("/", 1)[-1]
    text = "\x1f".join(str(p) for p in (seed, step, place, sample))
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ordered, index = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) > top_p  # keep the token crossing p
        logits = logits.masked_fill(drop.scatter(-1, index, drop), -math.inf)
    return logits


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,  # (B / group, P) left-padded
    prompt_mask: torch.Tensor,  # (B / group, P)
    seeds: list[int],  # (B,) one generator per sampled row
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    group: int = 1,
    min_new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(completion ids (B, T) padded after each row's stop token, mask (B, T) of the tokens up to
    and including the stop token, truncated (B,): no stop token within `max_new_tokens`).
    Row i samples from prompt i // group. `min_new_tokens`: stop tokens are masked out before
    that many tokens (generation_config's min_new_tokens; for equal-work benchmarks)."""
    from transformers import DynamicCache

    device = prompt_ids.device
    b = len(seeds)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    stop = torch.tensor(stop_ids, device=device)
    attention = prompt_mask.clone()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    kv = DynamicCache()
    cache = {_compat.cache_keyword(model): kv}
    out = model(
        input_ids=prompt_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **cache,
    )
    last = out.logits[:, -1]
    if group > 1:  # the prompt's cache, logits and positions to each of its rows
        kv.batch_repeat_interleave(group)
        last, attention, positions = (
            t.repeat_interleave(group, dim=0) for t in (last, attention, positions)
        )
    position = positions[:, -1:] + 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, masks = [], []
    for n in range(max_new_tokens):
        logits = last.float()
        if n < min_new_tokens:
            logits = logits.index_fill(1, stop, -math.inf)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(_filter(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.cat(
                [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(b)]
            )
        masks.append(~done)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attention,
            position_ids=position,
            use_cache=True,
            **cache,
        )
        last = out.logits[:, -1]
        position = position + 1
    ids = torch.stack(tokens, dim=1)
    mask = torch.stack(masks, dim=1).long()
    return ids, mask, ~done
