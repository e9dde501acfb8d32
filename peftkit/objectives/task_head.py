"""A classification or regression head (`task.type: classification | regression`, `objective:
sft`): a new `AutoModelForSequenceClassification` head reads the last non-pad token's state (the
[CLS] token of BERT-style encoders) and is trained with the adapter.

    classification: loss = sum over rows of -log softmax(head(h))[label] / rows
    regression:     loss = sum over rows of (head(h) - target)^2 / rows
Evaluations report accuracy, macro-F1 and the confusion matrix (or MSE, MAE, Pearson).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.data.labeled import LabeledRow, prepare_labeled_data
from peftkit.data.pipeline import PreparedData
from peftkit.methods.registry import registered_methods
from peftkit.objectives.base import BuildContext, ObjectiveKind, RecipeView, Support
from peftkit.objectives.registry import register
from peftkit.objectives.sft import SFTObjective

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from peftkit.objectives.runtime import Objective


class TaskHead(ObjectiveKind):
    """A new classification or regression head, trained with the adapter."""

    name = "task_head"
    spec = SFTObjective
    precedence = 20
    head = "sequence_classification"
    peft_task_type = "SEQ_CLS"
    needs_eos = False
    row_type = LabeledRow
    support = Support(
        plan="a task head (one prediction per row, no vocabulary-sized logits) is not modelled yet",
        gguf="GGUF holds a causal LM, not a task-head model",
        serving="a task-head model predicts a class or a number; it does not generate",
    )
    summary_line = "A new classification or regression head on the last token's state."

    @classmethod
    def selects(cls, recipe: RecipeView) -> bool:
        return recipe.task.type != "causal_lm"

    @classmethod
    def rules(cls, recipe: RecipeView) -> list[str]:
        problems = []
        kind = f"task.type {recipe.task.type!r}"
        if recipe.output.sample_prompts:
            problems.append(f"output.sample_prompts: a {kind} model does not generate; remove them")
        if recipe.train.packing:
            problems.append(f"train.packing: a {kind} model reads one row at a time; remove it")
        if not recipe.adapter.task_heads:
            problems.append(
                f"adapter.method {recipe.adapter.method!r} cannot train a {kind} head: use one of "
                + ", ".join(n for n, spec in registered_methods().items() if spec.task_heads)
            )
        if recipe.data.reference:
            problems.append(
                f"data.reference: the forgetting report scores a causal LM, not a {kind} head"
            )
        if recipe.eval.metric != "none":
            problems.append(
                f"eval.metric: a {kind} model does not generate; its metrics are built in"
            )
        if recipe.data.mixing.strategy != "concat":
            problems.append(
                f"data.mixing: multitask mixing is for causal-LM data, not a {kind} head yet"
            )
        if recipe.task.type == "regression" and recipe.task.labels:
            problems.append("task.labels names classes: a regression task has none")
        if recipe.task.labels is not None and len(recipe.task.labels) < 2:
            problems.append("task.labels: a classifier needs at least two labels")
        return problems

    @classmethod
    def packing_refusal(cls, recipe: RecipeView) -> str | None:
        return f"a task.type {recipe.task.type!r} model reads one row at a time"

    @classmethod
    def data_key(cls, recipe: RecipeView) -> dict[str, Any] | None:
        return recipe.task.model_dump(mode="json")

    @classmethod
    def prepare_data(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> tuple[PreparedData, list[str] | None]:
        return prepare_labeled_data(recipe.data, recipe.task, tokenizer, seed)

    @classmethod
    def head_config(cls, class_names: list[str] | None, pad_id: int | None) -> dict | None:
        from peftkit.models.load import head_config

        return head_config(class_names, pad_id)

    @classmethod
    def build(cls, ctx: BuildContext) -> Objective:
        from peftkit.objectives.causal_lm import run_batching
        from peftkit.objectives.heads import TaskHead

        batching = run_batching(ctx, token_loss=False)
        return TaskHead(ctx.tokenizer.pad_token_id, ctx.class_names, ctx.recipe.task.type, batching)

    @classmethod
    def summary_rows(cls, summary: dict[str, Any]) -> list[tuple[str, str]]:
        metrics = summary.get("eval_metrics")
        if not metrics:
            return []
        if "accuracy" in metrics:
            return [
                (
                    "eval accuracy",
                    f"{metrics['accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f})",
                )
            ]
        pearson = "-" if metrics["pearson"] is None else f"{metrics['pearson']:.4f}"
        return [
            (
                "eval error",
                f"MSE {metrics['mse']:.4f}, MAE {metrics['mae']:.4f}, Pearson {pearson}",
            )
        ]


register(TaskHead)
