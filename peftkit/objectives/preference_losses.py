"""Preference losses on per-sequence log-probabilities, one function per objective.

Each takes summed (or per-token mean) answer log-probs of the policy, and of the reference where
the objective has one, and returns per-example losses plus the rewards TRL logs, so the objective
can sum them (the loop normalises by the step's examples). The formulas are TRL 1.16's (DPO and KTO
as written inside `DPOTrainer._compute_loss` / `KTOTrainer._compute_loss`, ORPO's
`odds_ratio_loss`, CPO's `cpo_loss` with loss_type simpo); tests/e2e/test_preference_trl.py runs
TRL's trainers beside peftkit and compares losses and rewards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dpo_losses(
    chosen: torch.Tensor,  # (pairs,) summed answer log-probs, policy
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,  # (pairs,) the same under the reference
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str,
    chosen_tokens: torch.Tensor,  # (pairs,) answer tokens (ipo normalises by them)
    rejected_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards), rewards = beta * (log pi - log pi_ref)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # length-normalised log-ratios, TRL's reading of IPO's eq. 17
        ipo_delta = chosen_ratio / chosen_tokens.clamp(
            min=1
        ) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_terms(
    chosen_mean: torch.Tensor,  # (pairs,) mean answer log-prob per token, policy
    rejected_mean: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(beta * log sigmoid(log odds ratio), chosen rewards, rejected rewards, log odds ratio);
    ORPO's loss is NLL(chosen) minus the mean of the first."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    return (
        beta * ratio,
        beta * chosen_mean.detach(),
        beta * rejected_mean.detach(),
        log_odds.detach(),
    )


def simpo_losses(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta (l_w - l_l) - gamma) on length-normalised log-probs; rewards beta * l."""
    logits = (chosen_mean - rejected_mean) - gamma / beta
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_losses(
    logps: torch.Tensor,  # (rows,) summed answer log-probs, policy
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,  # (rows,) bool
    kl: torch.Tensor,  # () the batch's KL estimate, detached, >= 0
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted losses per row, rewards per row = beta * (log pi - log pi_ref))."""
    ratio = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach()
