"""One GGUF file for llama.cpp, Ollama and LM Studio: the merged model (weights, tokenizer, chat
template, + an Ollama Modelfile), or with `--adapter-only` a LoRA adapter in llama.cpp's form."""

from __future__ import annotations

from typing import Any, Literal

from peftkit.exporters.base import (
    ExportContext,
    Exporter,
    ExportRequest,
    ExportSection,
    FidelityThresholds,
    RunView,
)
from peftkit.exporters.registry import register

GgufQuant = Literal[
    "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
    "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k",
]  # fmt: skip


class GgufExport(ExportSection):
    """`format: gguf`: one file for llama.cpp, Ollama and LM Studio, read back with transformers'
    GGUF loader for the gate."""

    format: Literal["gguf"] = "gguf"
    quant: GgufQuant = "f16"
    """The type of the 2-D weights (norms and biases stay f32)."""


def gguf_thresholds(spec: GgufExport) -> FidelityThresholds:
    """8- (and 6-), 5- and 4-bit (and lower) weights get their own, looser gates; f32/f16/bf16
    use the usual one."""
    if spec.quant in ("q8_0", "q6_k"):
        return spec.q8_0_thresholds
    if spec.quant.startswith("q5"):
        return spec.q5_thresholds
    if spec.quant.startswith(("q4", "q3", "q2")):
        return spec.q4_thresholds
    return spec.thresholds


class _Gguf(Exporter):
    spec = GgufExport
    card = "gguf"

    @classmethod
    def refusal(cls, run: RunView, request: ExportRequest) -> str | None:
        if request.target is not None:
            return "GGUF holds a causal LM: no --target"
        kind = run.recipe.objective_kind
        if kind.support.gguf is not None:
            return f"objective {kind.name}: no GGUF export ({kind.support.gguf})"
        return cls.gguf_refusal(run) or super().refusal(run, request)

    @classmethod
    def gguf_refusal(cls, run: RunView) -> str | None:
        return None

    @classmethod
    def thresholds(cls, spec: Any) -> FidelityThresholds:
        return gguf_thresholds(spec)

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"quant": spec.quant}


class MergedGguf(_Gguf):
    name = "gguf"
    what = "the merged model as one GGUF file (weights as `quant`, tokenizer, chat template) + Modelfile"
    merges = True

    @classmethod
    def gguf_refusal(cls, run: RunView) -> str | None:
        if run.mergeable:
            return None
        return (
            f"{run.recipe.adapter.method} cannot be merged into the weights, so it cannot be "
            "written as GGUF; export it with --adapter-only instead"
        )

    @classmethod
    def check(cls, ctx: ExportContext) -> None:
        ctx.check_gguf(ctx.spec.quant, adapter_only=False)

    @classmethod
    def build(cls, ctx: ExportContext) -> Any:
        return ctx.write_gguf(ctx.merged_weights(), ctx.spec.quant)


class AdapterGguf(_Gguf):
    name = "gguf-adapter"
    what = "a LoRA adapter as llama.cpp's GGUF adapter file (`--lora` of llama.cpp)"
    adapter_only = True

    @classmethod
    def gguf_refusal(cls, run: RunView) -> str | None:
        if run.recipe.adapter.gguf_adapter:
            return None
        return (
            f"{run.recipe.adapter.method} adapters have no llama.cpp GGUF form (LoRA's have): "
            "export merged weights as GGUF, or the adapter without --format gguf"
        )

    @classmethod
    def check(cls, ctx: ExportContext) -> None:
        ctx.check_gguf(ctx.spec.quant, adapter_only=True)

    @classmethod
    def build(cls, ctx: ExportContext) -> Any:
        return ctx.write_lora_gguf(ctx.spec.quant)


register(MergedGguf)
register(AdapterGguf)
