"""The forgetting report: loss on a general-text reference set before, during and after training.

`data.reference` rows are scored on every token (language-modelling loss). The first score is
taken at step 0, before any update, with the base function: the base as loaded plus the fresh
adapter (LoRA, IA3, ... start as the identity), or, for virtual-token methods, whose fresh prompt
is not, the base with the adapter switched off. A rising reference loss while the task eval loss
falls is forgetting:

    reference ppl 12.1 -> 13.4 (+10.7%) while task eval loss 2.31 -> 1.02
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.metrics import MetricsLog


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50))


def reference_metrics(loss: float) -> dict[str, float]:
    """{"reference_loss", "reference_ppl"} from the reference set's mean loss per token, scored
    with the model as it is now (at step 0: the base function, see the module docstring)."""
    return {"reference_loss": loss, "reference_ppl": ppl(loss)}


def forgetting_summary(metrics: MetricsLog, rows: int, tokens: int) -> dict[str, Any]:
    """Reference loss/perplexity before and after, their change, and the task eval loss beside."""
    curve, evals = metrics.series("reference_loss"), dict(metrics.eval_losses())
    (first_step, before), (last_step, after) = curve[0], curve[-1]
    return {
        "reference_rows": rows,
        "reference_tokens": tokens,
        "reference_loss_before": before,
        "reference_loss_after": after,
        "reference_loss_change": after - before,
        "reference_ppl_before": ppl(before),
        "reference_ppl_after": ppl(after),
        "reference_ppl_change_pct": 100 * (ppl(after) / ppl(before) - 1),
        "eval_loss_before": evals.get(first_step),
        "eval_loss_after": evals.get(last_step),
    }


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The printed forgetting line, when the run had a reference set."""
    f = s.get("forgetting")
    if f is None:
        return []
    line = (
        f"reference ppl {f['reference_ppl_before']:.2f} -> {f['reference_ppl_after']:.2f} "
        f"({f['reference_ppl_change_pct']:+.1f}%; loss {f['reference_loss_before']:.4f} -> "
        f"{f['reference_loss_after']:.4f})"
    )
    if f["eval_loss_before"] is not None and f["eval_loss_after"] is not None:
        line += f" while task eval loss {f['eval_loss_before']:.4f} -> {f['eval_loss_after']:.4f}"
    return [("forgetting", line)]
