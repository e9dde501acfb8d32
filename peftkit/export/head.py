"""Export of a task-head model (classification / regression): merged weights, verified.

The trained model — the base with its new head, plus the adapter (LoRA's `modules_to_save` carries
the trained head) or the whole trained model — is merged, written as safetensors, reloaded with
plain `AutoModelForSequenceClassification.from_pretrained`, and compared with the trained model on
held-out rows, both in fp32: relative error of the outputs, and the share of rows on which the
predicted class agrees (regression: always 1, the relative error is the test). The gate is the
causal LM's (`export.fidelity`): `export.thresholds.max_relative_error` and
`min_greedy_agreement` (read as prediction agreement; a head has no per-token KL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftkit.data.labeled import prepare_labeled_data
from peftkit.errors import ExportError
from peftkit.export.build import to_fp32
from peftkit.export.fidelity import enforce_gate, gate_failures, log_kept
from peftkit.export.source import ExportSource
from peftkit.export.write import model_card, write_model
from peftkit.exporters.safetensors import SafetensorsExport
from peftkit.io import FIDELITY, atomic_dir, atomic_write_json, atomic_write_text
from peftkit.models.load import DTYPES, head_config, load_model
from peftkit.objectives.heads import collate_labeled, head_outputs


def export_head_model(
    source: ExportSource, out: Path, spec: SafetensorsExport, allow_drift: bool, log
) -> dict[str, Any]:
    """Refused before this (`peftkit.exporters.head.TaskHead.refusal`): a quantized base."""
    r = source.recipe
    tokenizer = AutoTokenizer.from_pretrained(str(source.result_dir))
    seed = r.data_seed
    data, _ = prepare_labeled_data(r.data, r.task, tokenizer, seed)
    rows = (data.eval or data.train)[: spec.samples]
    trained = _trained(source, tokenizer.pad_token_id)
    reference = _outputs(trained, rows, tokenizer.pad_token_id)
    merged = (
        trained.merge_and_unload(safe_merge=True) if isinstance(trained, PeftModel) else trained
    )
    report: dict[str, Any] = {
        "source": str(source.result_dir),
        "method": r.adapter.method,
        "task": r.task.type,
        "dtype": spec.dtype,
        "samples_from": "eval data" if data.eval else "training data (the run had no eval data)",
        "thresholds": spec.thresholds.model_dump(),
        "allow_drift": allow_drift,
        "what": f"merged {spec.dtype} weights of AutoModelForSequenceClassification",
    }
    with atomic_dir(out) as tmp:
        write_model(merged, tmp, spec.dtype, spec.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        reloaded = AutoModelForSequenceClassification.from_pretrained(
            str(tmp), dtype=torch.float32, use_safetensors=True
        ).eval()
        got = _outputs(reloaded, rows, tokenizer.pad_token_id)
        relative = float((got - reference).norm() / reference.norm().clamp_min(1e-12))
        agreement = (
            float((got.argmax(-1) == reference.argmax(-1)).float().mean())
            if reference.dim() == 2
            else 1.0
        )
        failures = gate_failures(
            spec.thresholds, relative, agreement, agreement_name="prediction agreement"
        )
        report.update(
            fidelity={
                "relative_error": relative,
                "max_abs_error": float((got - reference).abs().max()),
                "prediction_agreement": agreement,
                "rows": len(rows),
            },
            passed=not failures,
            failures=failures,
        )
        atomic_write_json(tmp / FIDELITY, report)
        atomic_write_text(tmp / "README.md", model_card(source, "merged", report))
        log(
            f"fidelity on {len(rows)} rows: relative error {relative:.3g}, prediction agreement "
            f"{agreement:.3f}" + ("" if not failures else f" — FAILED: {'; '.join(failures)}")
        )
        enforce_gate(failures, allow_drift)
    log_kept(failures, out, log)
    return report


def _trained(source: ExportSource, pad_token_id: int | None) -> nn.Module:
    if source.whole_model:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(source.result_dir), dtype=torch.float32, use_safetensors=True
        )
        return model.eval()
    dtype = DTYPES[source.meta.get("weights_dtype", "float32")]
    head = head_config(source.meta.get("class_names"), pad_token_id)
    base = to_fp32(load_model(source.recipe.model, dtype, torch.device("cpu"), head))
    try:
        return PeftModel.from_pretrained(base, str(source.result_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(
            f"the adapter in {source.result_dir} does not fit its base: {e}"
        ) from None


@torch.no_grad()
def _outputs(model: nn.Module, rows, pad_id: int) -> torch.Tensor:
    outs = [
        head_outputs(model, collate_labeled(rows[i : i + 8], pad_id))
        for i in range(0, len(rows), 8)
    ]
    return torch.cat(outs)
