"""`peftkit export`: resolve the registered exporter that writes the run as its `export:` section
and the flags ask (`peftkit.exporters`), let it build (merge or copy, write, read back), measure
what it built against the trained model, and keep it only if it passes the one fidelity gate."""

from __future__ import annotations

import dataclasses
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
from transformers import AutoTokenizer

from peftkit.data.encode import EncodedRow
from peftkit.errors import ExportError
from peftkit.export import build
from peftkit.export.context import RunContext
from peftkit.export.fidelity import (
    client_failures,
    compare,
    enforce_gate,
    log_kept,
    reference_outputs,
    sample_rows,
)
from peftkit.export.prompt import apply_training_prompt
from peftkit.export.source import ExportSource, resolve_source
from peftkit.export.write import model_card
from peftkit.exporters import Exporter, ExportRequest, ExportSection, exporter_for
from peftkit.exporters.registry import format_of, section_classes, section_for
from peftkit.io import (
    FIDELITY,
    RunLayout,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    guard_output,
)
from peftkit.recipe.schema import ExportDType, ExportFormat, GgufQuant, MergeBase
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
        format: merged safetensors, one GGUF file for llama.cpp/Ollama, or another registered
            exporter's format (default: the recipe's export.format); its section's keys only.
        quant: GGUF weight type (default: the recipe's export.quant).
        trust_remote_code: export a run whose recipe has model.trust_remote_code (its model's
            own Python code runs); refused without.
        log: where progress lines and the fidelity report go.
    """
    source = resolve_source(path, trust_remote_code)
    overrides = {
        "dtype": dtype,
        "max_shard_size": max_shard_size,
        "merge_base": merge_base,
        "format": format,
        "quant": quant,
    }
    spec = _section(source.recipe.export, {k: v for k, v in overrides.items() if v is not None})
    if target is not None and target not in TARGETS:
        raise ExportError(f"unknown serving target {target!r}; known: {', '.join(TARGETS)}")
    out = Path(out)
    inputs = [source.run_dir, source.recipe.model.name, source.recipe.model.tokenizer or ""]
    inputs += [s.path for s in source.recipe.data.sources]
    guard_output(out, "export", inputs, overwrite, "pass --overwrite", ExportError)
    exporter = _resolve(source, spec, ExportRequest(adapter_only, target), log)

    tokenizer = AutoTokenizer.from_pretrained(str(source.result_dir))
    ctx = RunContext(source, spec, out, tokenizer, target, None, {}, log, allow_drift=allow_drift)
    if not exporter.causal_lm:  # it measures its own model (a task head's logits)
        report = exporter.build(ctx)
        _record_export(source.run_dir, out)
        return report
    exporter.check(ctx)  # refuse before anything is loaded or merged
    ctx.rows, rows_from = _held_out_rows(source, tokenizer, spec)
    prompt = apply_training_prompt(source, tokenizer, spec.samples)  # (the template, in place)
    ctx.system_prompt = prompt.system_prompt
    stop_ids = source.meta.get("stop_token_ids") or [tokenizer.eos_token_id]
    ctx.gen = (spec.generate_tokens, stop_ids, tokenizer.pad_token_id)
    log(
        f"loading the trained model ({source.recipe.adapter.method} on {source.recipe.model.name}) ..."
    )
    ctx.reference = reference_outputs(
        build.load_trained(source), ctx.rows, *ctx.gen, prompt.client_prompts
    )
    gc.collect()  # the trained model is gone before any merged weights exist (peft's cycles too)
    limits = exporter.thresholds(spec)
    report = ctx.report
    report.update(
        {
            "source": str(source.result_dir),
            "method": source.recipe.adapter.method,
            "format": spec.format,
            "exporter": exporter.name,
            **exporter.describe(spec),
            "samples_from": rows_from,
            "thresholds": limits.model_dump(),
            "allow_drift": allow_drift,
            "prompt": prompt.to_dict(),
        }
    )
    with atomic_dir(out) as tmp:
        ctx.out = tmp
        candidate = exporter.build(ctx)
        failures = _gate(ctx, candidate, limits, prompt.client_prompts)
        atomic_write_text(tmp / "README.md", model_card(source, exporter.card, report))
        log(format_fidelity(report))
        enforce_gate(failures, allow_drift)
    log_kept(failures, out, log)
    _record_export(source.run_dir, out)
    return report


def _section(spec: ExportSection, overrides: dict[str, Any]) -> ExportSection:
    """The recipe's `export:` section with the flags' overrides, re-validated (before anything is
    loaded or merged). `--format` picks another format's section, keeping the shared keys."""
    fmt = overrides.get("format", spec.format)
    try:
        cls = section_for(fmt)
    except ValueError as e:
        raise ExportError(f"--format: {e}") from None
    values = spec.model_dump(exclude={"format"})
    if type(spec) is not cls:
        values = {k: v for k, v in values.items() if k in ExportSection.model_fields}
    for key in overrides:
        if key not in cls.model_fields:
            flag = "--" + key.replace("_", "-")
            owners = [format_of(s) for s in section_classes() if key in s.model_fields]
            raise ExportError(
                f"{flag} is an option of export format {' / '.join(owners)}, not {fmt}"
                + (f": add --format {owners[0]}" if owners else "")
            )
    try:
        return cls.model_validate({**values, **overrides, "format": fmt})
    except ValidationError as e:
        problems = [
            f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: " + error_message(err)
            for err in e.errors()
        ]
        raise ExportError("; ".join(problems)) from None


def _resolve(
    source: ExportSource, spec: ExportSection, request: ExportRequest, log
) -> type[Exporter]:
    """The registered exporter that writes `source` as `spec` and the flags ask, its refusals
    raised; a run that cannot merge falls back to the adapter-only exporter where it may."""
    exporter = exporter_for(source, spec, request)
    if exporter.merges and exporter.falls_back and not source.mergeable:
        log(
            f"{source.recipe.adapter.method} cannot be merged into the base model (virtual tokens, "
            "or a merge peftkit does not declare for it): writing an adapter-only export"
        )
        request = dataclasses.replace(request, adapter_only=True)
        exporter = exporter_for(source, spec, request)
    refusal = exporter.refusal(source, request)
    if refusal is not None:
        raise ExportError(refusal)
    return exporter


def _gate(ctx: RunContext, candidate: nn.Module, limits, client_prompts) -> list[str]:
    """The one fidelity gate: the candidate against the trained model on the held-out rows and
    the client-rendered prompts; the report (fidelity.json, written into the export) updated."""
    fidelity = compare(ctx.reference, candidate, ctx.rows, *ctx.gen)
    client, client_problems = client_failures(
        ctx.reference, candidate, client_prompts, limits, *ctx.gen
    )
    failures = fidelity.failures(limits) + ctx.problems + client_problems
    ctx.report.update(fidelity=fidelity.to_dict(), passed=not failures, failures=failures)
    if client_prompts:
        ctx.report["client_rendering"] = client
    atomic_write_json(ctx.out / FIDELITY, ctx.report)
    return failures


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
    source: ExportSource, tokenizer, spec: ExportSection
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
