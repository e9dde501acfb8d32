"""GRPO's math on per-token log-probabilities: group advantages and the clipped policy loss.

The definitions are TRL 1.16's (`GRPOTrainer._generate_and_score_completions` for the advantages,
`GRPOTrainer._compute_loss` for the loss); tests/unit/test_grpo_losses.py runs TRL's own methods
beside these functions on the same inputs and compares the loss and the LoRA gradients.

For G completions o_1..o_G of one prompt with rewards r_i (a weighted sum over reward functions):

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)       scale_rewards: group (std within the group),
                                                  batch (std over the whole batch), none (no /)
    w_i,t = pi(o_i,t) / pi_old(o_i,t)             importance_sampling_level: token
    w_i   = exp(mean_t log w_i,t)                 importance_sampling_level: sequence (GSPO)
    l_i,t = -min(w A_i, clip(w, 1 - eps_low, 1 + eps_high) A_i) + beta KL_i,t
    KL_i,t = w (pi_ref / pi - log(pi_ref / pi) - 1)   (k3 estimator times the importance weight,
                                                  TRL's use_bias_correction_kl; beta = 0: no reference)

and the loss reduces l over the completion tokens per `loss_type`:

    grpo:    mean_i (sum_t l_i,t / |o_i|)                       (each sequence weighs the same)
    bnpo:    sum_i,t l_i,t / sum_i |o_i|                        (per micro-batch token mean)
    dr_grpo: sum_i,t l_i,t / (B * max_completion_length)        (Dr. GRPO: no length bias)
    dapo:    sum_i,t l_i,t / tokens of the whole generation batch (per process)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation ignoring NaN (Bessel-corrected, as TRL's `nanstd`)."""
    keep = dim is not None
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=keep)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=keep)
    return torch.sqrt(variance * count / (count - 1))


@dataclass
class Advantages:
    """One generation batch's advantages and what the step logs of its rewards."""

    advantages: torch.Tensor  # (prompts * G,)
    rewards: torch.Tensor  # (prompts * G,) weighted sum over the reward functions (NaN: unscorable)
    zero_std: (
        torch.Tensor
    )  # (prompts * G,) True where the group's (or batch's) rewards did not vary


def group_advantages(
    rewards_per_func: torch.Tensor,  # (prompts * G, functions); NaN where a function returned None
    weights: torch.Tensor,  # (functions,)
    num_generations: int,
    scale_rewards: str = "group",
) -> Advantages:
    """Advantages of completions laid out group after group (the G completions of a prompt are
    neighbours). A completion no function could score gets advantage 0 and is left out of its
    group's baseline."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale_rewards!r}")
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = (_nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())).expand_as(rewards)
    elif num_generations > 1:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), rewards, zero_std)


@dataclass
class PolicyLoss:
    """A micro-batch's loss (before gradient accumulation) and the sums its metrics are made of."""

    loss: torch.Tensor
    kl_sum: torch.Tensor  # sum over completion tokens of the k3 KL (0 when beta = 0)
    low_clipped: torch.Tensor  # tokens (or sequences, at sequence level) clipped below, summed
    high_clipped: torch.Tensor
    counted: torch.Tensor  # what the clip sums count: tokens, or sequences at sequence level


def policy_loss(
    logps: torch.Tensor,  # (B, T) per-token log-probs of the completions under the policy
    old_logps: torch.Tensor | None,  # (B, T) the same when they were sampled; None = logps.detach()
    ref_logps: torch.Tensor | None,  # (B, T) under the reference; needed when beta != 0
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, T) 1 on completion tokens that count
    *,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int = 256,
    generation_batch_tokens: torch.Tensor | None = None,
    accumulation: int = 1,
    use_bias_correction_kl: bool = True,
) -> PolicyLoss:
    """GRPO's clipped surrogate loss of one micro-batch, as `loss.backward()` should see it under
    gradient accumulation over `accumulation` micro-batches.

    `generation_batch_tokens` (dapo): the completion tokens of the whole generation batch on this
    process, divided as TRL does into `accumulation` windows (pass `tokens * accumulation /
    steps_per_generation`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)  # (B, 1)
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(
            f"importance_sampling_level must be token or sequence, not {importance_sampling_level!r}"
        )
    ratio = torch.exp(log_weights)  # (B, T) or (B, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl_sum = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference's log-probs")
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1
        if use_bias_correction_kl:  # unbiased reverse-KL gradient (DeepSeek-V3.2), TRL's default
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        kl_sum = (per_token_kl * mask).sum().detach()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length) / accumulation
    else:  # dapo
        if generation_batch_tokens is None:
            raise ValueError("loss_type dapo needs generation_batch_tokens")
        loss = (per_token * mask).sum() / generation_batch_tokens.clamp(min=1.0)
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(logps.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(logps.dtype)
    if ratio.shape[1] == 1:  # sequence level: one weight per completion
        counted = torch.tensor(float(ratio.shape[0]), device=logps.device)
        low_sum, high_sum = low.sum(), high.sum()
    else:
        counted = mask.sum()
        low_sum, high_sum = (low * mask).sum(), (high * mask).sum()
    return PolicyLoss(loss, kl_sum, low_sum.detach(), high_sum.detach(), counted.detach())


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P) left-padded prompts
    prompt_mask: torch.Tensor,  # (B, P)
    completion_ids: torch.Tensor,  # (B, T) right-padded completions
    completion_mask: torch.Tensor,  # (B, T)
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, T) log-probabilities of each completion token under `model`, at the sampling
    temperature (logits / temperature, as the completions were drawn and as TRL scores them).
    Only the completion positions' logits are computed (`logits_to_keep`)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    keep = completion_ids.size(1)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep + 1
    ).logits[:, :-1]  # (B, T, vocab): position t predicts completion token t
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
