"""Merged transformers weights (sharded safetensors + tokenizer), the default export, and the
adapter-only export (`--adapter-only`, or a method that cannot merge) that shares its section."""

from __future__ import annotations

from typing import Any, Literal

from peftkit.exporters.base import ExportContext, Exporter, ShardedSection
from peftkit.exporters.registry import register

ExportDType = Literal["bfloat16", "float16", "float32"]


class SafetensorsExport(ShardedSection):
    """`format: safetensors`: the weights as transformers loads them (the default format)."""

    format: Literal["safetensors"] = "safetensors"
    """safetensors = merged transformers weights (+ tokenizer); gguf = one file with weights,
    tokenizer and chat template for llama.cpp, Ollama and LM Studio (+ an Ollama Modelfile)."""
    dtype: ExportDType = "bfloat16"
    """The dtype of the merged weights."""


class MergedSafetensors(Exporter):
    name = "merged"
    spec = SafetensorsExport
    what = "the adapter merged into the base weights, as sharded safetensors (+ tokenizer)"
    merges = True
    falls_back = True

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"dtype": spec.dtype}

    @classmethod
    def build(cls, ctx: ExportContext) -> Any:
        spec = ctx.spec
        model = ctx.merged_weights()
        ctx.write_safetensors(model, spec.dtype, spec.max_shard_size)
        del model
        ctx.report["what"] = (
            f"merged {spec.dtype} weights (sharded safetensors, max shard {spec.max_shard_size})"
        )
        return ctx.read_back()


class AdapterSafetensors(Exporter):
    name = "adapter"
    spec = SafetensorsExport
    what = "the PEFT adapter as trained (base weights unchanged); `--target vllm` checks it"
    adapter_only = True
    card = "adapter"
    targets = ("vllm",)

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"dtype": spec.dtype}

    @classmethod
    def build(cls, ctx: ExportContext) -> Any:
        ctx.report["what"] = "a PEFT adapter (base weights unchanged)"
        return ctx.write_adapter()


register(MergedSafetensors)
register(AdapterSafetensors)
