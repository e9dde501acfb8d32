"""Kahneman-Tversky Optimization (`objective: {type: kto}`) on rows labelled desirable or not. The
loss is in preference_losses.py (`kto_losses`); the reference and metrics in preference.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from peftkit.objectives.base import Support
from peftkit.objectives.preference import PreferenceKind, PreferenceSpec
from peftkit.objectives.registry import register

if TYPE_CHECKING:
    from peftkit.objectives.runtime import Objective


class KTOObjective(PreferenceSpec):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on {prompt, completion, label} rows
    (pairs are split into a desirable and an undesirable row). With z = KL estimate of the batch
    (mismatched prompt/completion pairs, as TRL builds it):
        desirable:   w_d (1 - sigmoid(beta (rho - z)))
        undesirable: w_u (1 - sigmoid(beta (z - rho)))
    """

    type: Literal["kto"]
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)

    @property
    def needs_reference(self) -> bool:
        return True


class KTO(PreferenceKind):
    """KTO: one row per answer (not pairs), a KL estimate from mismatched rows."""

    name = "kto"
    spec = KTOObjective
    unpaired = True
    summary_line = "Kahneman-Tversky Optimization on answers labelled desirable or undesirable."
    support = Support(
        plan="answers and their mismatched KL rows in one micro-batch, reference forwards"
    )

    @classmethod
    def runtime(cls) -> type[Objective]:
        from peftkit.objectives.preference_run import KTOLoss

        return KTOLoss


register(KTO)
