"""What a run tells the user: parameter counts, the end-of-run summary, run metadata."""

from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import peftkit
from peftkit import _compat, units
from peftkit.objectives.registry import registered_objectives
from peftkit.training import generated, reference

if TYPE_CHECKING:
    from peftkit.data.pipeline import PreparedData
    from peftkit.data.step_plan import StepPlan
    from peftkit.io import RunLayout
    from peftkit.metrics import MetricsLog
    from peftkit.objectives.runtime import Objective
    from peftkit.recipe.schema import Recipe
    from peftkit.training.checkpoint import TrainerState


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters; packed 4-bit weights count as the values they hold."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if _compat.is_packed_4bit(p):
            n *= 2  # two 4-bit values per stored uint8
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def run_summary(
    *,
    recipe: Recipe,
    state: TrainerState,
    metrics: MetricsLog,
    objective: Objective,
    data: PreparedData,
    plan: StepPlan,
    params: dict[str, int],
    layers: dict[str, Any],
    stop_reason: str,
    processes: int,
    engine: str,
    precision: str,
    run_dir: RunLayout,
    final: Path,
    kernels: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json: what the run did and reached (the figures the end-of-run printout shows).

    `kernels`: `Kernels.report` (`attention`, `speedups`: which fused paths ran, why not);
    `engine`: single, DDP, FSDP2 or DeepSpeed ZeRO-n (`update.engine_name`); `precision`: bf16,
    fp16 or fp32 (what the run computed in)."""
    r = recipe
    train_losses, eval_losses = metrics.train_losses(), metrics.eval_losses()
    peak, peak_kind = peak_memory_bytes()
    summary = {
        "run_dir": str(run_dir.path),
        "method": r.adapter.method,
        "objective_kind": r.objective_kind.name,
        "stop_reason": stop_reason,
        "steps": state.step,
        "epochs": round(state.step / plan.steps_per_epoch, 3),
        "global_batch_rows": plan.global_batch,
        "processes": processes,
        "engine": engine,
        "precision": precision,
        "tokens": state.tokens_seen,
        "supervised_tokens": state.supervised_tokens_seen,
        "loss_unit": objective.unit,
        "train_seconds": round(state.train_seconds, 2),
        "tokens_per_s": round(state.tokens_seen / max(state.train_seconds, 1e-9), 1),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "largest_micro_batch_tokens": state.largest_micro_batch_tokens,
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "first_train_loss": train_losses[0][1] if train_losses else None,
        "final_train_loss": train_losses[-1][1] if train_losses else None,
        "first_eval_loss": eval_losses[0][1] if eval_losses else None,
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "best_eval_loss": state.best_eval_loss,
        **_best_metric(r, state),
        "best_step": state.best_step,
        "eval_metrics": None,
        "final": str(final),
        "best": str(run_dir.best) if run_dir.best.exists() else None,
        **layers,
        **(kernels or {}),
    }
    summary |= objective.summary(metrics, plan, state.step)
    return summary  # the callbacks add theirs (answers, forgetting: training/callbacks.py)


def device_name(device: torch.device) -> str:
    """The device as report.html shows it: `cuda:0 (NVIDIA H100 80GB HBM3)`, `cpu`, `mps`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def run_metadata(
    *,
    recipe: Recipe,
    data: PreparedData,
    params: dict[str, int],
    precision: str,
    weights_dtype: torch.dtype,
    processes: int,
    stop_ids: list[int],
    class_names: list[str] | None,
    base_model_path: str,
    device: torch.device,
) -> dict[str, Any]:
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
        "base_model": recipe.model.name,
        "base_model_path": base_model_path,
        "method": recipe.adapter.method,
        "task": recipe.task.type,
        "class_names": class_names,
        "final_dir": recipe.adapter.final_dir_name,
        "precision": precision,
        "device": device_name(device),
        "weights_dtype": str(weights_dtype).removeprefix("torch."),
        "processes": processes,
        "chat_template_source": data.chat_template.source,
        "stop_tokens": data.stop_tokens,
        "stop_token_ids": stop_ids,
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "data_audit": [a.to_dict() for a in data.audits],
    }


def _best_metric(r, state) -> dict[str, Any]:
    """The metric that picked best/ (train.early_stopping.metric) and its best value."""
    stopping = r.train.early_stopping
    if stopping is None or stopping.metric == "eval_loss" or state.best_value is None:
        return {"best_metric": "eval_loss"}
    value = -state.best_value if stopping.higher_is_better else state.best_value
    return {"best_metric": stopping.metric, "best_metric_value": value}


def _objective_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The lines the run's objective gives of its own summary entries."""
    kind = registered_objectives().get(s.get("objective_kind", ""))
    return [] if kind is None else kind.summary_rows(s)


def _speedup_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """`attention` and one word per fused path: on, or off with its reason."""
    if "speedups" not in s:
        return []
    words = [
        f"{name.replace('_', ' ')} "
        + (
            "on" + (f" ({v['partly']})" if "partly" in v else "")
            if v["used"]
            else f"off ({v['reason']})"
        )
        for name, v in s["speedups"].items()
    ]
    return [("attention", str(s["attention"])), ("speedups", "; ".join(words))]


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
        ("engine", f"{s.get('engine', '-')}, precision {s.get('precision', '-')}"),
        (
            "tokens",
            f"{s['tokens']:,} real (non-pad), {s['supervised_tokens']:,} "
            + (
                "with loss"
                if s.get("loss_unit", "supervised tokens") == "supervised tokens"
                else f"{s['loss_unit']} in the loss"
            ),
        ),
        (
            "throughput",
            f"{s['tokens_per_s']:,.0f} tokens/s over {units.duration(s['train_seconds'])} of "
            "training steps",
        ),
        ("peak memory", f"{units.size(s['peak_memory_bytes'])} ({s['peak_memory_kind']})"),
        *_speedup_rows(s),
        ("train loss", loss_line(s["first_train_loss"], s["final_train_loss"])),
        (
            "eval loss",
            loss_line(s["first_eval_loss"], s["final_eval_loss"])
            + (
                f" (best {s['best_eval_loss']:.4f} at step {s['best_step']})"
                if s["best_eval_loss"] is not None and s.get("best_metric_value") is None
                else f" (best {s['best_metric']} {s['best_metric_value']:.4f} at step "
                f"{s['best_step']})"
                if s.get("best_metric_value") is not None
                else ""
            ),
        ),
        *_objective_rows(s),
        *generated.summary_rows(s),
        *reference.summary_rows(s),
        ("result", s["final"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "── peftkit run summary " + "─" * 40]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    metrics = s.get("eval_metrics") or {}
    if "confusion_matrix" in metrics:
        from peftkit.objectives.heads import format_confusion

        lines.append("  confusion matrix (eval, true class down):")
        lines += [f"    {line}" for line in format_confusion(metrics)]
    if prompts and before is not None and after is not None:
        lines += sample_lines(prompts, before, after)
    return "\n".join(lines)


def sample_lines(prompts: list[str], before: list[str], after: list[str]) -> list[str]:
    """The summary's samples section: each prompt's greedy answer before -> after training."""
    lines = ["  samples (greedy, before -> after training):"]
    for p, b, a in zip(prompts, before, after):
        lines += [f"    prompt: {p}", f"      before: {b[:120]!r}", f"      after:  {a[:120]!r}"]
    return lines


def peak_memory_bytes() -> tuple[int, str]:
    """Peak memory of this process: on GPU the caching allocator's peak reservation (what the
    GPU holds for torch; allocated is less, the CUDA context more), else peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved(), "cuda max reserved"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS"
