"""`peftkit export`: merge (or copy) the trained result, reload it with plain transformers, measure
it against the trained model, and keep it only if it passes the fidelity gate."""

from __future__ import annotations

import gc
import json
import logging
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from peftkit.data.encode import EncodedRow
from peftkit.errors import ExportError
from peftkit.export import build
from peftkit.export.fidelity import (
    Fidelity,
    Reference,
    client_failures,
    compare,
    enforce_gate,
    log_kept,
    reference_outputs,
    sample_rows,
)
from peftkit.export.gguf_export import (
    check_gguf_export,
    export_gguf,
    export_lora_gguf,
    gguf_thresholds,
)
from peftkit.export.prompt import apply_training_prompt
from peftkit.export.source import ExportSource, resolve_source
from peftkit.export.stream import CannotStream, MergedWeights, streaming_refusal
from peftkit.export.vllm import check_vllm
from peftkit.export.write import copy_adapter, model_card, write_generation_config, write_model
from peftkit.io import (
    FIDELITY,
    RunLayout,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    guard_output,
)
from peftkit.models.load import model_source
from peftkit.recipe.schema import ExportDType, ExportFormat, ExportSpec, GgufQuant, MergeBase
from peftkit.report import refresh_run_report
from peftkit.section import error_message

Target = Literal["vllm"]
TARGETS = typing.get_args(Target)


_logger = logging.getLogger(__name__)


def export(
    path: str | Path,
    out: str | Path,
    *,
    dtype: ExportDType | None = None,
    max_shard_size: str | None = None,
    merge_base: MergeBase | None = None,
    allow_drift: bool = False,
    adapter_only: bool = False,
    target: Target | None = None,
    overwrite: bool = False,
    format: ExportFormat | None = None,
    quant: GgufQuant | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = _logger.info,
) -> dict[str, Any]:
    """Export a run (or a result folder inside one) to `out`; returns the report (also fidelity.json).

    `format` "gguf" writes one GGUF file (weights as `quant`) and an Ollama Modelfile instead of
    safetensors; the file is read back with transformers' GGUF loader for the gate. A kept export
    is recorded in the run's exports.jsonl and its fidelity shown in the run's report.html.

    Raises `FidelityGateFailed` (and leaves no `out`) when the exported model drifts from the
    trained one beyond the recipe's `export.thresholds` (`export.q8_0_thresholds` for GGUF q8_0),
    a GGUF tokenizer encodes held-out rows differently, or held-out prompts sent as an OpenAI
    client sends them (no system turn, through the exported chat template, which carries
    `data.system_prompt` as its default) render or answer differently, unless `allow_drift`.

    Args:
        dtype: weights dtype (default: the recipe's export.dtype).
        max_shard_size: largest weights file, e.g. 2GB (default: the recipe's export.max_shard_size).
        merge_base: QLoRA merge base (default: the recipe's export.merge_base).
        allow_drift: keep the export even if the fidelity gate fails.
        adapter_only: write the adapter, not merged weights.
        target: check (and losslessly fix) the adapter for a server.
        overwrite: replace an existing output folder (only a previous export).
        format: merged safetensors, or one GGUF file for llama.cpp/Ollama (default: the recipe's
            export.format).
        quant: GGUF weight type (default: the recipe's export.quant).
        trust_remote_code: export a run whose recipe has model.trust_remote_code (its model's
            own Python code runs); refused without.
        log: where progress lines and the fidelity report go.
    """
    source = resolve_source(path, trust_remote_code)
    updates = {
        "dtype": dtype,
        "max_shard_size": max_shard_size,
        "merge_base": merge_base,
        "format": format,
        "quant": quant,
    }
    spec: ExportSpec = source.recipe.export.model_copy(
        update={k: v for k, v in updates.items() if v is not None}
    )
    try:  # re-validate the overrides, before anything is loaded or merged
        spec = ExportSpec.model_validate(spec.model_dump())
    except ValidationError as e:
        problems = [
            f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: " + error_message(err)
            for err in e.errors()
        ]
        raise ExportError("; ".join(problems)) from None
    if target is not None and target not in TARGETS:
        raise ExportError(f"unknown serving target {target!r}; known: {', '.join(TARGETS)}")
    out = Path(out)
    inputs = [source.run_dir, source.recipe.model.name, source.recipe.model.tokenizer or ""]
    inputs += [s.path for s in source.recipe.data.sources]
    guard_output(out, "export", inputs, overwrite, "pass --overwrite", ExportError)
    to_gguf = spec.format == "gguf"
    kind = source.recipe.objective_kind
    if to_gguf and target is not None:
        raise ExportError("GGUF holds a causal LM: no --target")
    if to_gguf and kind.support.gguf is not None:
        raise ExportError(f"objective {kind.name}: no GGUF export ({kind.support.gguf})")
    if to_gguf and adapter_only and not source.recipe.adapter.gguf_adapter:
        raise ExportError(
            f"{source.recipe.adapter.method} adapters have no llama.cpp GGUF form (LoRA's have): "
            "export merged weights as GGUF, or the adapter without --format gguf"
        )
    if to_gguf and not adapter_only and not source.mergeable:
        raise ExportError(
            f"{source.recipe.adapter.method} cannot be merged into the weights, so it cannot be "
            "written as GGUF; export it with --adapter-only instead"
        )
    refusal = None if source.whole_model else source.recipe.adapter.export_refusal(adapter_only)
    if refusal is not None:
        raise ExportError(refusal)
    if not source.mergeable and not adapter_only:
        log(
            f"{source.recipe.adapter.method} cannot be merged into the base model (virtual tokens, "
            "or a merge peftkit does not declare for it): writing an adapter-only export"
        )
        adapter_only = True
    if target is not None and not adapter_only:
        raise ExportError(
            "--target checks adapter-only exports: add --adapter-only (merged weights need no check)"
        )

    if kind.head == "sequence_classification":  # a new head: exported with its weights
        if adapter_only or target is not None:
            raise ExportError("task-head models export as merged weights only (no --adapter-only)")
        from peftkit.export.head import export_head_model

        report = export_head_model(source, out, spec, allow_drift, log)
        _record_export(source.run_dir, out)
        return report
    tokenizer = AutoTokenizer.from_pretrained(str(source.result_dir))
    if to_gguf:  # refuse before anything is loaded or merged
        check_gguf_export(source, tokenizer, spec.quant, adapter_only)
    rows, rows_from = _held_out_rows(source, tokenizer, spec)
    prompt = apply_training_prompt(source, tokenizer, spec.samples)  # (the template, in place)
    stop_ids = source.meta.get("stop_token_ids") or [tokenizer.eos_token_id]
    gen = (spec.generate_tokens, stop_ids, tokenizer.pad_token_id)
    log(
        f"loading the trained model ({source.recipe.adapter.method} on {source.recipe.model.name}) ..."
    )
    reference = reference_outputs(build.load_trained(source), rows, *gen, prompt.client_prompts)
    gc.collect()  # the trained model is gone before any merged weights exist (peft's cycles too)
    limits = gguf_thresholds(spec) if to_gguf else spec.thresholds
    report: dict[str, Any] = {
        "source": str(source.result_dir),
        "method": source.recipe.adapter.method,
        "format": spec.format,
        **({"quant": spec.quant} if to_gguf else {"dtype": spec.dtype}),
        "samples_from": rows_from,
        "thresholds": limits.model_dump(),
        "allow_drift": allow_drift,
        "prompt": prompt.to_dict(),
    }
    problems: list[str] = []
    with atomic_dir(out) as tmp:
        if adapter_only and to_gguf:
            candidate = export_lora_gguf(source, tmp, spec, report, log)
        elif adapter_only:
            candidate = _export_adapter(source, tmp, tokenizer, target, report, log)
        elif to_gguf:
            model = _merged_weights(source, spec, reference, rows, gen, report, log)
            candidate, problems = export_gguf(
                model, source, tokenizer, tmp, spec, rows, report, log, prompt.system_prompt
            )
            del model
        else:
            model = _merged_weights(source, spec, reference, rows, gen, report, log)
            write_generation_config(model, source, tokenizer)
            write_model(model, tmp, spec.dtype, spec.max_shard_size)
            tokenizer.save_pretrained(str(tmp))
            del model
            gc.collect()  # the merged weights are gone before the written ones are read back
            report["what"] = (
                f"merged {spec.dtype} weights (sharded safetensors, max shard {spec.max_shard_size})"
            )
            candidate = build.reload_exported(str(tmp))
        fidelity = compare(reference, candidate, rows, *gen)
        client, client_problems = client_failures(
            reference, candidate, prompt.client_prompts, limits, *gen
        )
        failures = fidelity.failures(limits) + problems + client_problems
        report.update(fidelity=fidelity.to_dict(), passed=not failures, failures=failures)
        if prompt.client_prompts:
            report["client_rendering"] = client
        atomic_write_json(tmp / FIDELITY, report)
        atomic_write_text(
            tmp / "README.md",
            model_card(
                source, "gguf" if to_gguf else "adapter" if adapter_only else "merged", report
            ),
        )
        log(format_fidelity(report))
        enforce_gate(failures, allow_drift)
    log_kept(failures, out, log)
    _record_export(source.run_dir, out)
    return report


def _record_export(run_dir: Path, out: Path) -> None:
    """A line in the run's exports.jsonl, and its report.html rewritten to show the fidelity."""
    run = RunLayout(run_dir)
    record = {"out": str(out.resolve()), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        with run.exports.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a read-only run directory: the export itself is done and fine
        _logger.warning("could not record the export in %s: %s", run.exports, e)
        return
    refresh_run_report(run.path)


def _held_out_rows(
    source: ExportSource, tokenizer, spec: ExportSpec
) -> tuple[list[EncodedRow], str]:
    recipe = source.recipe
    data = recipe.objective_kind.scored_rows(recipe, tokenizer, recipe.data_seed)
    rows, where = (
        (data.eval, "eval data")
        if data.eval
        else (data.train[::-1], "training data (the run had no eval data)")
    )
    picked = sample_rows(rows, spec.samples, spec.max_sample_tokens)
    if not picked:
        raise ExportError("no held-out row with supervised tokens to compare the export against")
    return picked, where


def _merged_weights(
    source: ExportSource, spec: ExportSpec, reference: Reference, rows, gen, report, log
) -> nn.Module | MergedWeights:
    """The merged model: streamed from the base checkpoint one layer at a time where that is
    exact (see `stream`), else built whole in memory, the reason logged and reported."""
    reason = streaming_refusal(source)
    if reason is None:
        try:
            weights = MergedWeights.of_run(source)
            report["merge"] = "streamed"
            log("merging the adapter one layer at a time from the base checkpoint ...")
            return weights
        except CannotStream as e:
            reason = str(e)
    report["merge"] = f"in memory: {reason}"
    log(f"merging in memory ({reason}) ...")
    return _merged_model(source, spec, reference, rows, gen, report, log)


def _merged_model(
    source: ExportSource, spec: ExportSpec, reference: Reference, rows, gen, report, log
) -> nn.Module:
    if source.whole_model:
        return build.load_trained(source)
    if source.recipe.model.quantization is None:
        return build.merged(build.dense_base(source), source)
    # QLoRA: measure the merge bases against the trained model, keep the closest.
    names = ["original", "dequantized"] if spec.merge_base == "auto" else [spec.merge_base]
    measured: dict[str, Fidelity] = {}
    best_name, best_model = None, None
    for name in names:
        base = build.dense_base(source) if name == "original" else build.dequantized_base(source)[0]
        model = build.merged(base, source)
        measured[name] = compare(reference, model, rows, *gen)
        log(
            f"merge base {name}: relative error {measured[name].relative_error:.3g}, mean KL {measured[name].mean_kl:.3g}"
        )
        if best_name is None or measured[name].mean_kl < measured[best_name].mean_kl:
            best_name, best_model = name, model
    if source.recipe.model.quantization.bits == 4:
        base, blocksizes = build.dequantized_base(source)
        requantized = build.requantize(build.merged(base, source), source, blocksizes)
        measured["requantized"] = compare(reference, requantized, rows, *gen)
        log(
            f"(for comparison) merged into re-quantized 4-bit weights: relative error "
            f"{measured['requantized'].relative_error:.3g}, mean KL {measured['requantized'].mean_kl:.3g}"
        )
        del requantized
    report["merge_bases"] = {k: v.to_dict() for k, v in measured.items()}
    report["merge_base"] = best_name
    log(f"merge base: {best_name}" + (" (closest to the trained model)" if len(names) > 1 else ""))
    return best_model


def _export_adapter(
    source: ExportSource, tmp: Path, tokenizer, target: str | None, report, log
) -> nn.Module:
    copy_adapter(source, tmp)
    tokenizer.save_pretrained(str(tmp))
    stop_ids = source.meta.get("stop_token_ids") or [tokenizer.eos_token_id]
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(
        str(tmp)
    )
    report["what"] = "a PEFT adapter (base weights unchanged)"
    if target == "vllm":
        base_config = AutoConfig.from_pretrained(
            model_source(source.recipe.model),
            revision=source.recipe.model.revision,
            trust_remote_code=source.recipe.model.trust_remote_code,
        )
        check = check_vllm(tmp, base_config.vocab_size, tokenizer)
        report["serving"] = {
            "target": target,
            "fixes": check.fixes,
            "problems": check.problems,
            "notes": check.notes,
        }
        for line in check.fixes:
            log(f"vllm: fixed (lossless): {line}")
        for line in check.notes:
            log(f"vllm: {line}")
        if check.problems:
            raise ExportError(
                "the adapter cannot be served by vLLM as is:\n"
                + "\n".join(f"  - {p}" for p in check.problems)
            )
    return build.load_trained(source, adapter_dir=tmp)


def format_fidelity(report: dict[str, Any]) -> str:
    f, t = report["fidelity"], report["thresholds"]
    rows = [
        ("relative error", f"{f['relative_error']:.3g}", f"<= {t['max_relative_error']:g}"),
        ("mean KL (nats/token)", f"{f['mean_kl']:.3g}", f"<= {t['max_mean_kl']:g}"),
        ("max KL", f"{f['max_kl']:.3g}", ""),
        ("max |logit error|", f"{f['max_abs_error']:.3g}", ""),
        (
            "perplexity trained / exported",
            f"{f['perplexity_trained']:.4f} / {f['perplexity_candidate']:.4f}",
            "",
        ),
        ("greedy agreement", f"{f['greedy_agreement']:.3f}", f">= {t['min_greedy_agreement']:g}"),
    ]
    client = report.get("client_rendering")
    if client:  # held-out prompts as a client sends them (no system turn)
        rows += [
            (
                "client prompts rendered apart",
                f"{client['prompts_rendered_differently']} of {client['prompts']}",
                "= 0",
            ),
            (
                "client greedy agreement",
                f"{client['greedy_agreement']:.3f}",
                f">= {t['min_greedy_agreement']:g}",
            ),
        ]
    lines = [
        f"fidelity on {f['samples']} samples ({f['tokens']} tokens) from the {report['samples_from']}:"
    ]
    lines += [f"  {name:<30} {value:<22} {limit}" for name, value, limit in rows]
    lines.append(
        "  verdict: "
        + ("passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    )
    return "\n".join(lines)
