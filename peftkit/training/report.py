"""What a run tells the user: parameter counts, the end-of-run summary, run metadata."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import peftkit
from peftkit.training import reference, tasks

if TYPE_CHECKING:
    from peftkit.training.loop import FineTuneRun


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters; packed 4-bit weights count as the values they hold."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored uint8
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def run_metadata(run: FineTuneRun) -> dict[str, Any]:
    """peftkit.json: what produced this run, and what later stages (export, serving) must honour."""
    import accelerate
    import peft
    import transformers

    return {
        "peftkit_version": peftkit.__version__,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "base_model": run.recipe.model.name,
        "base_model_path": str(run.ctx.tokenizer_path),
        "method": run.recipe.adapter.method,
        "task": run.recipe.task.type,
        "class_names": run.class_names,
        "final_dir": run.recipe.adapter.final_dir_name,
        "precision": run.precision,
        "weights_dtype": str(run.weights_dtype).removeprefix("torch."),
        "processes": run.accelerator.num_processes,
        "chat_template_source": run.data.chat_template.source,
        "stop_tokens": run.data.stop_tokens,
        "stop_token_ids": run.stop_ids,
        "trainable_params": run.params["trainable"],
        "total_params": run.params["total"],
        "data_audit": [a.to_dict() for a in run.data.audits],
    }


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _head_rows(metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not metrics:
        return []
    if "accuracy" in metrics:
        return [
            ("eval accuracy", f"{metrics['accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f})")
        ]
    pearson = "-" if metrics["pearson"] is None else f"{metrics['pearson']:.4f}"
    return [
        ("eval error", f"MSE {metrics['mse']:.4f}, MAE {metrics['mae']:.4f}, Pearson {pearson}")
    ]


def format_summary(
    s: dict[str, Any], prompts: list[str], before: list[str] | None, after: list[str] | None
) -> str:
    def loss_line(first: float | None, last: float | None) -> str:
        return "-" if first is None else f"{first:.4f} -> {last:.4f}"

    rows = [
        ("run directory", s["run_dir"]),
        (
            "method",
            f"{s['method']}: {s['trainable_params']:,} trainable of {s['total_params']:,} params "
            f"({s['trainable_params'] / max(s['total_params'], 1):.2%})",
        ),
        (
            "steps",
            f"{s['steps']} ({s['epochs']} epochs, {s['global_batch_rows']} rows per step, "
            f"{s['processes']} process{'es' if s['processes'] > 1 else ''}); {s['stop_reason']}",
        ),
        ("tokens", f"{s['tokens']:,} real (non-pad), {s['supervised_tokens']:,} with loss"),
        ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s over {s['train_seconds']:.1f} s"),
        ("peak memory", f"{_mb(s['peak_memory_bytes'])} ({s['peak_memory_kind']})"),
        ("train loss", loss_line(s["first_train_loss"], s["final_train_loss"])),
        (
            "eval loss",
            loss_line(s["first_eval_loss"], s["final_eval_loss"])
            + (
                f" (best {s['best_eval_loss']:.4f} at step {s['best_step']})"
                if s["best_eval_loss"] is not None
                else ""
            ),
        ),
        *_head_rows(s.get("eval_metrics")),
        *tasks.summary_rows(s),
        *reference.summary_rows(s),
        ("result", s["final"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "── peftkit run summary " + "─" * 40]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    metrics = s.get("eval_metrics") or {}
    if "confusion_matrix" in metrics:
        from peftkit.training.heads import format_confusion

        lines.append("  confusion matrix (eval, true class down):")
        lines += [f"    {line}" for line in format_confusion(metrics)]
    if prompts and before is not None and after is not None:
        lines.append("  samples (greedy, before -> after training):")
        for p, b, a in zip(prompts, before, after):
            lines += [
                f"    prompt: {p}",
                f"      before: {b[:120]!r}",
                f"      after:  {a[:120]!r}",
            ]
    return "\n".join(lines)
