"""Simple Preference Optimization (`objective: {type: simpo}`): no reference model. The loss is in
preference_losses.py (`simpo_losses`); the pairs and metrics in preference.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.objectives.base import Support
from peftkit.objectives.preference import PreferenceKind, PreferenceSpec
from peftkit.objectives.registry import register

if TYPE_CHECKING:
    from peftkit.objectives.runtime import Objective


class SimPOObjective(PreferenceSpec):
    """Simple Preference Optimization (Meng et al. 2024): no reference model; length-normalised
    log-probs l_w, l_l and a target margin gamma:
        loss = -log sigmoid(beta (l_w - l_l) - gamma) + sft_weight * NLL(chosen)
    (TRL's CPO trainer with loss_type simpo; `simpo_gamma` and `cpo_alpha` there)."""

    type: Literal["simpo"]
    beta: float = Field(default=2.0, gt=0)
    gamma: float = Field(default=0.5, ge=0)
    """The target reward margin (TRL: simpo_gamma)."""
    sft_weight: float = Field(default=0.0, ge=0)
    """Weight of the chosen answers' NLL added to the loss (TRL: cpo_alpha; 0 = pure SimPO)."""


class SimPO(PreferenceKind):
    """SimPO: length-normalised margins, no reference model."""

    name = "simpo"
    spec = SimPOObjective
    summary_line = "Simple Preference Optimization: length-normalised margins, no reference."
    support = Support(plan="chosen and rejected answers in one micro-batch")

    @classmethod
    def runtime(cls) -> type[Objective]:
        from peftkit.objectives.preference_run import SimPOLoss

        return SimPOLoss


register(SimPO)
