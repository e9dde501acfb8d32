"""A task-head model (`objective: {type: sft}` with a classification or regression head): the
merged weights of `AutoModelForSequenceClassification`, head included, gated on its logits."""

from __future__ import annotations

from typing import Any

from peftkit.exporters.base import ExportContext, Exporter, ExportRequest, RunView
from peftkit.exporters.registry import register
from peftkit.exporters.safetensors import SafetensorsExport


class TaskHead(Exporter):
    name = "task-head"
    spec = SafetensorsExport
    what = "a task-head model's merged weights (AutoModelForSequenceClassification), head included"
    precedence = 10
    merges = True
    causal_lm = False

    @classmethod
    def selects(cls, run: RunView, request: ExportRequest) -> bool:
        return run.recipe.objective_kind.head == "sequence_classification"

    @classmethod
    def refusal(cls, run: RunView, request: ExportRequest) -> str | None:
        if request.adapter_only or request.target is not None:
            return "task-head models export as merged weights only (no --adapter-only)"
        if run.recipe.model.quantization is not None:
            return "exporting a task head trained on a quantized base is not supported yet"
        return super().refusal(run, request)

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"dtype": spec.dtype}

    @classmethod
    def build(cls, ctx: ExportContext) -> Any:
        """Writes and gates the export itself (its logits are a head's, not a causal LM's): the
        report, not a candidate."""
        return ctx.export_head()


register(TaskHead)
