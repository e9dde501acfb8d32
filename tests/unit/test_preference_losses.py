"""peftkit's ORPO and SimPO terms equal TRL's own tensor functions (`ORPOTrainer.odds_ratio_loss`,
`CPOTrainer.cpo_loss` with loss_type simpo) on random log-probabilities; DPO and KTO, whose
formulas live inside TRL's trainers, are compared with the trainers in
tests/e2e/test_preference_trl.py."""

from __future__ import annotations

import types

import pytest
import torch

from peftkit.objectives.preference_losses import dpo_losses, orpo_terms, simpo_losses

pytestmark = pytest.mark.filterwarnings("ignore")


def _logps(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # mean log-probs per token: negative, some close to 0 (both branches of log1mexp)
    return -torch.rand(n, generator=g) * 3 - 1e-3, -torch.rand(n, generator=g) * 3 - 1e-3


def _trainer_self(**attrs):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **attrs)


def test_orpo_terms_equal_trl():
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = _logps()
    theirs = ORPOTrainer.odds_ratio_loss(_trainer_self(beta=0.25), chosen, rejected)
    ours = orpo_terms(chosen, rejected, 0.25)
    torch.testing.assert_close(ours[0], theirs[0])  # beta * log sigmoid(log odds ratio)
    torch.testing.assert_close(ours[1], theirs[1])  # chosen rewards
    torch.testing.assert_close(ours[2], theirs[2])  # rejected rewards
    torch.testing.assert_close(ours[3].mean(), theirs[4])  # mean log odds


def test_simpo_losses_equal_trl_cpo_simpo():
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected = _logps(seed=1)
    me = _trainer_self(beta=2.0, simpo_gamma=0.7, loss_type="simpo", label_smoothing=0.0, alpha=0.0)
    theirs = CPOTrainer.cpo_loss(me, chosen, rejected)
    ours = simpo_losses(chosen, rejected, 2.0, 0.7)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_dpo_losses_at_the_reference_and_beyond():
    chosen, rejected = _logps(seed=2)
    n = torch.full_like(chosen, 5.0)
    losses, r_c, r_r = dpo_losses(chosen, rejected, chosen, rejected, 0.1, "sigmoid", n, n)
    torch.testing.assert_close(losses, torch.full_like(losses, torch.log(torch.tensor(2.0)).item()))
    assert torch.all(r_c == 0) and torch.all(r_r == 0)
    # the chosen answer gaining 1 nat over the reference lowers the loss, by the sigmoid's slope
    better, *_ = dpo_losses(chosen + 1, rejected, chosen, rejected, 0.1, "sigmoid", n, n)
    torch.testing.assert_close(
        better, -torch.nn.functional.logsigmoid(torch.full_like(chosen, 0.1))
    )
    hinge, *_ = dpo_losses(chosen + 20, rejected, chosen, rejected, 0.1, "hinge", n, n)
    assert torch.all(hinge == 0)  # margin beta * 20 = 2 > 1
