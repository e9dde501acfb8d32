"""Supervised fine-tuning over several tasks (`objective: sft` with train sources of two or more
`data.train.N.task` names): the causal LM's loss, plus `loss/<task>` per step and
`eval_loss/<task>` per evaluation; the summary gives each task's rows, drawn share and eval loss.
How the tasks are mixed into the epochs is `data.mixing` (`peftkit.data.mixing`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.objectives.base import BuildContext, RecipeView
from peftkit.objectives.registry import register
from peftkit.objectives.sft import SFT

if TYPE_CHECKING:
    from peftkit.objectives.runtime import Objective


class Multitask(SFT):
    """Next-token cross-entropy over several tasks, with a loss per task."""

    name = "multitask"
    precedence = 10
    summary_line = (
        "Next-token cross-entropy over several tasks, mixed by data.mixing, with a loss per task."
    )

    @classmethod
    def selects(cls, recipe: RecipeView) -> bool:
        return len(recipe.data.train_tasks) > 1

    @classmethod
    def build(cls, ctx: BuildContext) -> Objective:
        from peftkit.objectives.causal_lm import CausalLM, Multitask, TaskLosses, run_batching

        batching, pad_id = run_batching(ctx), ctx.tokenizer.pad_token_id
        task_losses = TaskLosses.for_data(ctx.data, ctx.device)
        if task_losses is None:  # (the rows hold one task after all: no per-task losses)
            return CausalLM(batching, pad_id)
        return Multitask(batching, pad_id, task_losses, ctx.recipe.data, ctx.data)

    @classmethod
    def summary_rows(cls, summary: dict[str, Any]) -> list[tuple[str, str]]:
        """Lines of the printed summary, one per task."""
        s = summary
        rows = []
        for name, t in s.get("tasks", {}).items():
            evals = (
                f"; eval loss {t['first_eval_loss']:.4f} -> {t['final_eval_loss']:.4f}"
                if t["first_eval_loss"] is not None
                else ""
            )
            rows.append(
                (
                    f"task {name}",
                    f"{t['train_rows']} rows, {t['drawn_rows']} drawn ({t['drawn_share']:.1%}, "
                    f"expected {t['expected_share']:.1%}){evals}",
                )
            )
        return rows


register(Multitask)
