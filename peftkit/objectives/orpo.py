"""Odds Ratio Preference Optimization (`objective: {type: orpo}`): no reference model. The loss
is in preference_losses.py (`orpo_terms`); the pairs and metrics in preference.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from peftkit.objectives.base import Support
from peftkit.objectives.preference import PreferenceKind, PreferenceSpec
from peftkit.objectives.registry import register

if TYPE_CHECKING:
    from peftkit.objectives.runtime import Objective


class ORPOObjective(PreferenceSpec):
    """Odds Ratio Preference Optimization (Hong et al. 2024): no reference model. With mean
    log-probs per answer token l_w, l_l and log odds(y) = l - log(1 - exp(l)):
        loss = NLL(chosen) - beta * log sigmoid(log odds(y_w) - log odds(y_l))
    (`beta` is the paper's lambda, as in TRL)."""

    type: Literal["orpo"]


class ORPO(PreferenceKind):
    """ORPO: NLL plus the odds-ratio term, no reference model."""

    name = "orpo"
    spec = ORPOObjective
    summary_line = "Odds Ratio Preference Optimization: NLL plus an odds-ratio term, no reference."
    support = Support(plan="chosen and rejected answers in one micro-batch")

    @classmethod
    def runtime(cls) -> type[Objective]:
        from peftkit.objectives.preference_run import ORPOLoss

        return ORPOLoss


register(ORPO)
