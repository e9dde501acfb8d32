"""The steps `export()` hands an exporter's build (`peftkit.exporters.base.ExportContext`): the
merge (streamed or in memory, the QLoRA merge-base choice), the writers and the read-backs."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, GenerationConfig

from peftkit.data.encode import EncodedRow
from peftkit.errors import ExportError
from peftkit.export import build
from peftkit.export.fidelity import Fidelity, Reference, compare
from peftkit.export.gguf_export import check_gguf_export, export_gguf, export_lora_gguf
from peftkit.export.source import ExportSource
from peftkit.export.stream import CannotStream, MergedWeights, streaming_refusal
from peftkit.export.vllm import check_vllm
from peftkit.export.write import copy_adapter, write_generation_config, write_model
from peftkit.exporters.base import ExportSection
from peftkit.models.load import model_source


@dataclass
class RunContext:
    """An `ExportContext` over one run: `out` is the folder that becomes the export."""

    source: ExportSource
    spec: ExportSection
    out: Path
    tokenizer: Any
    target: str | None
    system_prompt: str | None
    report: dict[str, Any]
    log_fn: Any
    reference: Reference | None = None
    rows: list[EncodedRow] = field(default_factory=list)
    gen: tuple = ()
    allow_drift: bool = False
    problems: list[str] = field(default_factory=list)

    def log(self, line: str) -> None:
        self.log_fn(line)

    def merged_weights(self) -> nn.Module | MergedWeights:
        """The merged model: streamed from the base checkpoint one layer at a time where that is
        exact (see `stream`), else built whole in memory, the reason logged and reported."""
        reason = streaming_refusal(self.source)
        if reason is None:
            try:
                weights = MergedWeights.of_run(self.source)
                self.report["merge"] = "streamed"
                self.log("merging the adapter one layer at a time from the base checkpoint ...")
                return weights
            except CannotStream as e:
                reason = str(e)
        self.report["merge"] = f"in memory: {reason}"
        self.log(f"merging in memory ({reason}) ...")
        return self._merged_model()

    def _merged_model(self) -> nn.Module:
        source, report, rows, gen = self.source, self.report, self.rows, self.gen
        if source.whole_model:
            return build.load_trained(source)
        if source.recipe.model.quantization is None:
            return build.merged(build.dense_base(source), source)
        # QLoRA: measure the merge bases against the trained model, keep the closest.
        choice = self.spec.merge_base
        names = ["original", "dequantized"] if choice == "auto" else [choice]
        measured: dict[str, Fidelity] = {}
        best_name, best_model = None, None
        for name in names:
            base = (
                build.dense_base(source)
                if name == "original"
                else build.dequantized_base(source)[0]
            )
            model = build.merged(base, source)
            measured[name] = compare(self.reference, model, rows, *gen)
            self.log(
                f"merge base {name}: relative error {measured[name].relative_error:.3g}, "
                f"mean KL {measured[name].mean_kl:.3g}"
            )
            if best_name is None or measured[name].mean_kl < measured[best_name].mean_kl:
                best_name, best_model = name, model
        if source.recipe.model.quantization.bits == 4:
            base, blocksizes = build.dequantized_base(source)
            requantized = build.requantize(build.merged(base, source), source, blocksizes)
            measured["requantized"] = compare(self.reference, requantized, rows, *gen)
            self.log(
                f"(for comparison) merged into re-quantized 4-bit weights: relative error "
                f"{measured['requantized'].relative_error:.3g}, mean KL "
                f"{measured['requantized'].mean_kl:.3g}"
            )
            del requantized
        report["merge_bases"] = {k: v.to_dict() for k, v in measured.items()}
        report["merge_base"] = best_name
        closest = " (closest to the trained model)" if len(names) > 1 else ""
        self.log(f"merge base: {best_name}{closest}")
        return best_model

    def write_safetensors(self, model: Any, dtype: str, max_shard_size: str) -> None:
        write_generation_config(model, self.source, self.tokenizer)
        write_model(model, self.out, dtype, max_shard_size)
        self.tokenizer.save_pretrained(str(self.out))

    def read_back(self) -> nn.Module:
        gc.collect()  # the caller dropped the merged weights: gone before the written ones load
        return build.reload_exported(str(self.out))

    def write_adapter(self) -> nn.Module:
        source, tmp, tokenizer = self.source, self.out, self.tokenizer
        copy_adapter(source, tmp)
        tokenizer.save_pretrained(str(tmp))
        stop_ids = source.meta.get("stop_token_ids") or [tokenizer.eos_token_id]
        GenerationConfig(
            eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
        ).save_pretrained(str(tmp))
        if self.target == "vllm":
            self._check_vllm()
        return build.load_trained(source, adapter_dir=tmp)

    def _check_vllm(self) -> None:
        base_config = AutoConfig.from_pretrained(
            model_source(self.source.recipe.model),
            revision=self.source.recipe.model.revision,
            trust_remote_code=self.source.recipe.model.trust_remote_code,
        )
        check = check_vllm(self.out, base_config.vocab_size, self.tokenizer)
        self.report["serving"] = {
            "target": self.target,
            "fixes": check.fixes,
            "problems": check.problems,
            "notes": check.notes,
        }
        for line in check.fixes:
            self.log(f"vllm: fixed (lossless): {line}")
        for line in check.notes:
            self.log(f"vllm: {line}")
        if check.problems:
            raise ExportError(
                "the adapter cannot be served by vLLM as is:\n"
                + "\n".join(f"  - {p}" for p in check.problems)
            )

    def check_gguf(self, quant: str, adapter_only: bool) -> None:
        check_gguf_export(self.source, self.tokenizer, quant, adapter_only)

    def write_gguf(self, model: Any, quant: str) -> nn.Module:
        spec = self.spec.model_copy(update={"quant": quant})
        candidate, problems = export_gguf(
            model,
            self.source,
            self.tokenizer,
            self.out,
            spec,
            self.rows,
            self.report,
            self.log,
            self.system_prompt,
        )
        self.problems += problems
        return candidate

    def write_lora_gguf(self, quant: str) -> nn.Module:
        spec = self.spec.model_copy(update={"quant": quant})
        return export_lora_gguf(self.source, self.out, spec, self.report, self.log)

    def export_head(self) -> dict[str, Any]:
        from peftkit.export.head import export_head_model

        return export_head_model(self.source, self.out, self.spec, self.allow_drift, self.log)
