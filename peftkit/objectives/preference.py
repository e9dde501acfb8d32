"""What the preference objectives declare alike (dpo.py, kto.py, orpo.py and simpo.py each add
their section and loss): the `objective:` section's common knob, the recipe rules, the data
(pairs, or KTO's labelled rows, cached as supervised rows are), the reference model and the summary
lines. The runtime is `peftkit.objectives.preference_run`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from peftkit.data.chat import ChatTemplate
from peftkit.data.pipeline import PreparedData
from peftkit.data.preference import (
    PreferenceRow,
    mapped_preference_data,
    preference_key,
    preferred_answers,
    prepare_preference_data,
)
from peftkit.metrics import MetricsLog
from peftkit.objectives.base import BuildContext, ObjectiveKind, RecipeView
from peftkit.objectives.sft import causal_lm_rules
from peftkit.section import Section

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from peftkit.objectives.runtime import Objective


class PreferenceSpec(Section):
    """What every preference objective's section has."""

    beta: float = Field(default=0.1, gt=0)
    """Strength of the preference term (DPO/KTO: the KL penalty's inverse temperature)."""

    @property
    def needs_reference(self) -> bool:
        return False

    @property
    def precomputed_reference(self) -> bool:
        """The reference's log-probs are computed once before training (DPO's precompute_ref)."""
        return False


def plot_rewards(log: MetricsLog, ax: Any) -> None:
    """Reward margins (train per step, eval per evaluation) and held-out preference accuracy."""
    steps, margins = zip(*log.series("rewards/margins"))
    ax.plot(steps, margins, color="tab:purple", alpha=0.5, label="reward margin (train)")
    evals = log.series("eval_rewards/margins")
    if evals:
        steps, margins = zip(*evals)
        ax.plot(steps, margins, "o-", color="tab:purple", label="reward margin (eval)")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracy = log.series("eval_rewards/accuracies")
    if accuracy:
        right = ax.twinx()
        steps, values = zip(*accuracy)
        right.plot(
            steps,
            [100 * v for v in values],
            "s-",
            color="tab:green",
            label="preference accuracy (eval)",
        )
        right.set_ylabel("accuracy %", color="tab:green")
        right.set_ylim(-5, 105)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small", loc="upper left")
    ax.set_xlabel("optimizer step")


class PreferenceKind(ObjectiveKind):
    """What DPO, ORPO, SimPO and KTO declare alike: causal-LM answers scored as whole sequences,
    rows of pairs (or KTO's labelled rows), a reference model where the loss has one."""

    held_out_chats = False  # (preference rows are pairs, not chats)
    row_type = PreferenceRow
    unpaired: ClassVar[bool] = False
    """Rows are KTO's {prompt, completion, label} (pairs are split into two rows)."""
    reference_fix: ClassVar[str] = "use lora/dora/ia3 with their default init"
    """What to change when the reference cannot be the adapter switched off."""
    charts = ((plot_rewards, "rewards/margins"),)

    @classmethod
    def rules(cls, recipe: RecipeView) -> list[str]:
        kind = f"objective {recipe.objective.type}"
        problems = causal_lm_rules(recipe)
        if recipe.task.type != "causal_lm":
            problems.append(f"{kind} tunes a causal LM's answers; task.type must be causal_lm")
        if recipe.train.packing:
            problems.append(
                f"train.packing: {kind} scores each answer as its own sequence; remove it"
            )
        if recipe.data.reference:
            problems.append(
                f"data.reference: the forgetting report is for sft runs, not {kind} yet; remove it"
            )
        if recipe.data.mixing.strategy != "concat":
            problems.append(f"data.mixing: {kind} reads one preference set; remove data.mixing")
        if recipe.data.loss_on != "completion":
            problems.append(f"data.loss_on: {kind} always scores the answers only; remove it")
        spec, adapter = recipe.objective, recipe.adapter
        if (
            spec.needs_reference
            and not spec.precomputed_reference
            and not adapter.full_weights
            and not adapter.off_is_start
        ):
            problems.append(
                f"{kind}: the reference is the model as training starts, and adapter.method "
                f"{adapter.method!r} (this init) does not start as the base, so switching the "
                f"adapter off would score against another model: {cls.reference_fix}"
            )
        return problems

    @classmethod
    def packing_refusal(cls, recipe: RecipeView) -> str | None:
        return f"objective {recipe.objective.type} scores each answer as its own sequence"

    @classmethod
    def data_key(cls, recipe: RecipeView) -> dict[str, Any] | None:
        return preference_key(cls.unpaired)

    @classmethod
    def mapped_data(cls, folder: Path, template: ChatTemplate) -> PreparedData:
        return mapped_preference_data(folder, template)

    @classmethod
    def prepare_data(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> tuple[PreparedData, list[str] | None]:
        return prepare_preference_data(recipe.data, tokenizer, seed, cls.unpaired), None

    @classmethod
    def scored_rows(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> PreparedData:
        """The preferred answers (chosen, or KTO's desirable ones) as supervised rows."""
        data, _ = cls.prepare_data(recipe, tokenizer, seed)
        return replace(data, train=preferred_answers(data.train), eval=preferred_answers(data.eval))

    @classmethod
    def runtime(cls) -> type[Objective]:
        """Its runtime class (`peftkit.objectives.preference_run`), imported when built."""
        raise NotImplementedError

    @classmethod
    def build(cls, ctx: BuildContext) -> Objective:
        from peftkit.objectives.causal_lm import run_batching
        from peftkit.objectives.preference_run import frozen_copy

        spec, batching = ctx.recipe.objective, run_batching(ctx)
        is_adapter = hasattr(ctx.model, "disable_adapter")
        frozen = (
            frozen_copy(ctx.model)
            if spec.needs_reference and not is_adapter and not spec.precomputed_reference
            else None
        )
        return cls.runtime()(
            spec,
            ctx.tokenizer.pad_token_id,
            batching.supervised_only,
            ctx.unwrap,
            frozen,
            batching.lengths,
        )

    @classmethod
    def summary_rows(cls, summary: dict[str, Any]) -> list[tuple[str, str]]:
        """Held-out preference accuracy and reward margin, before -> after."""
        p = summary.get("preference")
        if not p or "eval_margins_before" not in p:
            return []
        line = f"margin {p['eval_margins_before']:+.4f} -> {p['eval_margins_after']:+.4f}"
        if "eval_accuracies_before" in p:
            line = (
                f"accuracy {p['eval_accuracies_before']:.1%} -> {p['eval_accuracies_after']:.1%}, "
                + line
            )
        return [(f"preference ({p['objective']})", line + " (held-out rows)")]
