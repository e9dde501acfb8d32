"""Direct Preference Optimization (`objective: {type: dpo}`), on {prompt, chosen, rejected} pairs.
The losses are in preference_losses.py; the pairs, reference and metrics in preference.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from peftkit.objectives.base import Support
from peftkit.objectives.preference import PreferenceKind, PreferenceSpec
from peftkit.objectives.registry import register

if TYPE_CHECKING:
    from peftkit.objectives.runtime import Objective


class DPOObjective(PreferenceSpec):
    """Direct Preference Optimization (Rafailov et al. 2023) on {prompt, chosen, rejected} pairs.

    With log-ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x) (summed over answer tokens) and rho_l:
        sigmoid: -log sigmoid(beta (rho_w - rho_l))
        ipo:     ((rho_w / |y_w| - rho_l / |y_l|) - 1 / (2 beta))^2   (TRL's length-normalised IPO)
        hinge:   max(0, 1 - beta (rho_w - rho_l))
    The reference pi_ref is the base: the adapter switched off (no second copy), a frozen copy of
    the starting weights for full/partial fine-tuning, or log-probs computed once before training.
    """

    type: Literal["dpo"]
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    precompute_ref: bool = False
    """Score every row with the reference once before training and keep the log-probs in the run
    directory (resume reuses them): no reference forward per step, no frozen copy in memory."""

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def precomputed_reference(self) -> bool:
        return self.precompute_ref


class DPO(PreferenceKind):
    """DPO's sigmoid, IPO or hinge loss on the policy's and the reference's log-ratios."""

    name = "dpo"
    spec = DPOObjective
    reference_fix = "set objective.precompute_ref: true"
    summary_line = "Direct Preference Optimization on {prompt, chosen, rejected} pairs."
    support = Support(plan="chosen and rejected answers in one micro-batch, reference forwards")

    @classmethod
    def runtime(cls) -> type[Objective]:
        from peftkit.objectives.preference_run import DPOLoss

        return DPOLoss


register(DPO)
