"""What every exporter declares: its recipe section (a member of the `export:` union, keyed on
`format`), which runs it handles and refuses, its fidelity limits, and its build step.

Exporters sit below the recipe, which composes their sections; their build steps are handed an
`ExportContext` by `peftkit.export.run.export` (the export package above holds the merge, the
writers and the read-back), so an exporter composes those steps and never imports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from peftkit.section import Section

MergeBase = Literal["auto", "original", "dequantized"]


class FidelityThresholds(Section):
    """Limits the exported model must meet against the trained model, or the export fails."""

    max_relative_error: float = Field(default=0.02, gt=0)
    """||logits_export - logits_trained|| / ||logits_trained|| over the samples."""
    max_mean_kl: float = Field(default=1e-3, gt=0)
    """Mean KL(trained || exported) per token, in nats."""
    min_greedy_agreement: float = Field(default=0.9, ge=0, le=1)
    """Share of greedily generated tokens on which both models agree."""


def check_size(value: str) -> str:
    if not re.fullmatch(r"\d+\s*[KMG]i?B", value.strip()):
        raise ValueError(f"{value!r} is not a size such as 500MB, 5GB or 2GiB")
    return value.strip()


class ExportSection(Section):
    """The keys every export format shares: what the gate compares and its limits. A format's
    section adds `format: Literal[...]` (its name in `export.format`) and its own keys."""

    merge_base: MergeBase = "auto"
    """For QLoRA: merge into the original 16-bit weights, into the dequantized NF4 weights training
    saw, or measure both and keep the closer (auto)."""
    samples: int = Field(default=16, gt=0)
    """Held-out rows compared between the trained and the exported model."""
    max_sample_tokens: int = Field(default=256, gt=1)
    generate_tokens: int = Field(default=16, gt=0)
    """Greedy tokens generated per sample for the agreement check."""
    thresholds: FidelityThresholds = FidelityThresholds()
    """The gate of 16- and 32-bit weights."""
    q8_0_thresholds: FidelityThresholds = FidelityThresholds(
        max_relative_error=0.05, max_mean_kl=5e-3, min_greedy_agreement=0.8
    )
    """The gate of 8- (and 6-) bit weights (GGUF q8_0: blocks of 32 with one f16 scale; q6_k),
    looser than `thresholds` for 16-bit exports. Measured on the quickstart run: relative error
    2.6e-3, mean KL 2.0e-5, greedy agreement 0.98 (f16: 7.6e-5, 1.3e-8, 1.0); README "GGUF for
    llama.cpp"."""
    q5_thresholds: FidelityThresholds = FidelityThresholds(
        max_relative_error=0.35, max_mean_kl=0.3, min_greedy_agreement=0.25
    )
    """The gate of 5-bit weights (GGUF q5_0 / q5_1 in blocks of 32, q5_k). Round-to-nearest 5
    bits cost small models much: measured on Gemma 3 270M (q5_0) relative error 0.17, mean KL
    0.034, greedy agreement 0.38; on SmolLM2-135M (q5_0 / q5_1) 0.18 / 0.32, 0.18 / 0.24, 0.38 /
    0.27. The gate catches a broken file (relative error ~1, KL of nats), not that loss."""
    q4_thresholds: FidelityThresholds = FidelityThresholds(
        max_relative_error=0.5, max_mean_kl=1.0, min_greedy_agreement=0.1
    )
    """The gate of 4-bit and lower weights (GGUF q4_0 / q4_1 in blocks of 32, q4_k, q3_k, q2_k).
    Measured (q4_0) on Gemma 3 270M: relative error 0.24, mean KL 0.39, greedy agreement 0.27; on
    SmolLM2-135M: 0.47, 0.72, 0.11. Like q5's, this gate catches a broken file, not the loss 4
    bits cost."""

    @model_validator(mode="before")
    @classmethod
    def _other_formats_keys(cls, data: Any) -> Any:
        """A key of another format (`quant` under `format: safetensors`) names that format. One
        at that format's default is dropped: a recipe saved before `export:` became a section per
        format holds every format's keys, at their defaults where it did not use them."""
        if not isinstance(data, dict) or "format" not in cls.model_fields:
            return data
        from peftkit.exporters.registry import format_of, section_classes

        kept = {}
        for key, value in data.items():
            owners = [s for s in section_classes() if key in s.model_fields]
            if key in cls.model_fields or not owners:
                kept[key] = value
            elif not all(_is_default(s.model_fields[key].default, value) for s in owners):
                fmt = format_of(owners[0])
                raise ValueError(
                    f"{key} is a key of export format "
                    f"{' / '.join(format_of(s) for s in owners)}, not {format_of(cls)}: set "
                    f"format: {fmt} (or remove {key})"
                )
        return kept


def _is_default(default: Any, value: Any) -> bool:
    if isinstance(default, Section) and isinstance(value, dict):
        return default.model_dump() == value
    return default == value


class ShardedSection(ExportSection):
    """An export written as sharded safetensors."""

    max_shard_size: str = "5GB"
    """Largest weights file, a number and a unit: 500MB, 5GB, 2GiB."""

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        return check_size(value)


@dataclass(frozen=True)
class ExportRequest:
    """What the caller asked for beyond the recipe's section (`peftkit export` flags)."""

    adapter_only: bool = False
    target: str | None = None


class RunView(Protocol):
    """What an exporter reads of the run it exports (`peftkit.export.source.ExportSource`)."""

    recipe: Any
    whole_model: bool
    mergeable: bool


class ExportContext(Protocol):
    """The steps `export()` hands an exporter's `build` (`peftkit.export.context`): each writes
    into `out`, the folder that becomes the export when the gate passes."""

    source: Any
    spec: ExportSection
    out: Path
    tokenizer: Any
    target: str | None
    system_prompt: str | None
    report: dict[str, Any]
    problems: list[str]
    """Gate failures a build finds itself (a GGUF tokenizer encoding rows apart); the gate adds them."""

    def log(self, line: str) -> None: ...
    def merged_weights(self) -> Any:
        """The merged model: streamed one layer at a time where exact, else built in memory."""

    def write_safetensors(self, model: Any, dtype: str, max_shard_size: str) -> None:
        """Write `model` as sharded safetensors (+ tokenizer, generation config)."""

    def read_back(self) -> Any:
        """Load what `write_safetensors` wrote with plain transformers: the candidate. Drop the
        merged weights first (`del`), so both are never in memory at once."""

    def write_adapter(self) -> Any:
        """Copy the adapter (+ tokenizer), check it for `target`, load it on the base: the candidate."""

    def check_gguf(self, quant: str, adapter_only: bool) -> None:
        """Refuse what GGUF cannot hold, from configs and tokenizer alone."""

    def write_gguf(self, model: Any, quant: str) -> Any:
        """Write one GGUF file (+ Modelfile) and read it back: the candidate."""

    def write_lora_gguf(self, quant: str) -> Any:
        """Write the LoRA adapter as a llama.cpp GGUF and apply it back: the candidate."""

    def export_head(self) -> dict[str, Any]:
        """Write a task-head model into the export folder, gated on its logits: the report."""


class Exporter:
    """One way to export a run. Subclass, set the class attributes, override what differs, and
    `peftkit.exporters.registry.register` the class; `export()` asks the registry which exporter
    runs a recipe's `export:` section (with the request's flags) and runs it."""

    name: ClassVar[str]
    """The exporter's name (fidelity.json's `exporter`)."""
    card: ClassVar[str] = "merged"
    """What the model card (README.md) says was exported: merged, adapter or gguf."""
    spec: ClassVar[type[ExportSection]]
    """The `export:` section it runs; exporters of one format share it, told apart by `selects`."""
    what: ClassVar[str]
    """One line for the exporters table."""
    precedence: ClassVar[int] = 0
    """Of the exporters whose section a recipe holds, the highest that selects it runs."""
    adapter_only: ClassVar[bool] = False
    """Selected by `--adapter-only` (else by its absence)."""
    merges: ClassVar[bool] = False
    """Writes merged weights; a run that cannot merge then falls back to the adapter-only
    exporter of the same format (with `falls_back`), or is refused by `refusal`."""
    falls_back: ClassVar[bool] = False
    targets: ClassVar[tuple[str, ...]] = ()
    """Serving targets (`--target`) it checks for."""
    causal_lm: ClassVar[bool] = True
    """Its candidate is a causal LM, measured by `export()`'s one gate against the trained model;
    False: `build` runs its own comparison and returns the report (a task head's logits)."""

    @classmethod
    def selects(cls, run: RunView, request: ExportRequest) -> bool:
        return cls.adapter_only == request.adapter_only

    @classmethod
    def refusal(cls, run: RunView, request: ExportRequest) -> str | None:
        """Why this exporter cannot export `run` as asked (None: it can), before anything loads:
        what the trained adapter itself refuses (`MethodSpec.export_refusal`), or a `--target` it
        does not check."""
        if not run.whole_model:
            refusal = run.recipe.adapter.export_refusal(request.adapter_only)
            if refusal is not None:
                return refusal
        if request.target is not None and request.target not in cls.targets:
            return (
                "--target checks adapter-only exports: add --adapter-only (merged weights need no "
                "check)"
            )
        return None

    @classmethod
    def thresholds(cls, spec: Any) -> FidelityThresholds:
        """The gate's limits for this export."""
        return spec.thresholds

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        """Keys of fidelity.json naming what was written (e.g. its dtype)."""
        return {}

    @classmethod
    def check(cls, ctx: ExportContext) -> None:
        """Refusals that need the tokenizer or configs, before any weights are loaded."""

    @classmethod
    def build(cls, ctx: ExportContext) -> Any:
        """Write the export into `ctx.out`; return the candidate model the gate measures."""
        raise NotImplementedError
