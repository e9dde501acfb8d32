"""Log-probs of G completions of one prompt with the prompt run once: the shared-prefix forward.

GRPO scores `num_generations` completions of every prompt. Run row by row, each of the G rows
carries its own copy of the prompt: G x (P + T) tokens through the forward (and the backward).
Here the prompt runs once per group with a KV cache, the cache is repeated to the group's G rows
(`repeat_interleave`, differentiable: the G rows' gradients add up in the shared prompt's keys and
values) and the completions run on top of it: P + G x T tokens.

It is exact: positions are those of the plain forward (arange over prompt + completion, as
transformers numbers a call without position ids and TRL scores it), the prompt's left padding
is masked by the same attention mask, and the first completion token is predicted by the
prompt's last position as before. Only the arithmetic order differs (float rounding).
tests/unit/test_shared_prefix.py checks the log-probs and LoRA gradients against the plain
forward. With adapter dropout the G rows share one dropout mask over the prompt (row by row each
row draws its own): both are unbiased, but they are different draws.

Where it cannot run, `support_problem` says why, and the plain per-row forward runs instead.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def support_problem(model: nn.Module, distributed_type: str) -> str | None:
    """Why the shared-prefix forward cannot train this model (None: it can). `model`: the
    unwrapped model; `distributed_type`: accelerate's (`accelerator.distributed_type`)."""
    kind = str(distributed_type).rsplit(".", 1)[-1].upper()
    if kind in ("FSDP", "DEEPSPEED"):
        return f"{kind.lower()} shards the weights per forward; the plain forward runs once"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not {"cache", "past_key_values"} & set(inspect.signature(type(base).forward).parameters):
        return f"{type(base).__name__}'s forward takes no KV cache"
    if getattr(base, "is_gradient_checkpointing", False):
        return "gradient checkpointing runs each layer without a KV cache"
    return None


def shared_prefix_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,  # (N, P) left-padded, one row per group
    prompt_mask: torch.Tensor,  # (N, P)
    completion_ids: torch.Tensor,  # (N * G, T) right-padded, group after group
    completion_mask: torch.Tensor,  # (N * G, T)
    group: int,
    temperature: float,
    keyword: str,
) -> torch.Tensor:
    """(N * G, T) log-probs of each completion token, the prompt of each group run once.
    `keyword`: the forward's name for the cache (`_compat.cache_keyword`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        use_cache=True,
        logits_to_keep=1,
        **{keyword: cache},
    )
    first = out.logits[:, -1:].repeat_interleave(group, dim=0)  # (N * G, 1, vocab) -> token 0
    t = completion_ids.shape[1]
    if t > 1:
        cache.batch_repeat_interleave(group)  # (N, heads, P, d) -> (N * G, heads, P, d)
        mask = torch.cat([prompt_mask.repeat_interleave(group, dim=0), completion_mask], dim=1)
        rest = model(
            input_ids=completion_ids[:, :-1],  # the last token predicts nothing scored
            attention_mask=mask[:, :-1],
            use_cache=True,
            **{keyword: cache},
        ).logits  # (N * G, T - 1, vocab)
        logits = torch.cat([first, rest], dim=1)
    else:
        logits = first
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def group_prompts(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's prompt once, from rows laid out group after group (checked: the G rows of a
    group hold the same prompt)."""
    ids, mask = prompt_ids[::group], prompt_mask[::group]
    same = torch.equal(ids.repeat_interleave(group, dim=0), prompt_ids) and torch.equal(
        mask.repeat_interleave(group, dim=0), prompt_mask
    )
    if not same:
        raise ValueError("rows of one group hold different prompts: no prefix to share")
    return ids, mask
