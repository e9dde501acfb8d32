"""Batches, loss, evaluation metrics and the runtime of a task head (task_head.py): sequence
classification / regression.

Loss: cross-entropy over the classes, or squared error for regression, summed over rows (the loop
divides by the rows of the whole step, as it divides causal-LM loss by supervised tokens).
Metrics: accuracy, macro-F1 and the confusion matrix (rows = true class, columns = predicted);
regression: MSE, MAE and Pearson correlation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.audit import audit_lines, audit_record
from peftkit.data.labeled import LabeledRow
from peftkit.data.step_plan import StepPlan
from peftkit.metrics import MetricsLog
from peftkit.objectives.batches import Batching
from peftkit.objectives.runtime import Objective


def collate_labeled(rows: list[LabeledRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the texts; `labels` is (batch,): class ids (long) or targets (float)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (batch, seq)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row.input_ids)] = torch.from_numpy(row.input_ids)
        attention[i, : len(row.input_ids)] = 1
    labels = torch.from_numpy(np.concatenate([r.labels for r in rows]))  # (batch,)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def head_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, classes) logits, or (batch,) predictions for regression, in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float()
    return logits.squeeze(-1) if batch["labels"].is_floating_point() else logits


def head_row_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) cross-entropy per row, or squared error for regression, from `head_outputs`."""
    labels = labels.to(out.device)
    if labels.is_floating_point():
        return F.mse_loss(out, labels, reduction="none")
    return F.cross_entropy(out, labels, reduction="none")


def classification_metrics(
    predicted: np.ndarray, true: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (mean over classes of 2PR/(P+R), 0 where undefined), confusion matrix."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(k), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(k), where=confusion.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0
    )
    return {
        "accuracy": float(tp.sum() / max(len(true), 1)),
        "macro_f1": float(f1.mean()),
        "confusion_matrix": confusion.tolist(),
        "labels": names,
    }


def regression_metrics(predicted: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    error = predicted - true
    pearson = (
        float(np.corrcoef(predicted, true)[0, 1])
        if len(true) > 1 and predicted.std() > 0 and true.std() > 0
        else None
    )
    return {
        "mse": float((error**2).mean()),
        "mae": float(np.abs(error).mean()),
        "pearson": pearson,
    }


def format_confusion(metrics: dict[str, Any]) -> list[str]:
    """The confusion matrix as aligned text lines (true class down, predicted across)."""
    names = metrics["labels"]
    width = max(6, *(len(n) for n in names))
    lines = [
        " " * (width + 2) + " ".join(f"{n[:width]:>{width}}" for n in names) + "  <- predicted"
    ]
    for name, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"{name[:width]:>{width}}  " + " ".join(f"{v:>{width}}" for v in row))
    return lines


def head_metrics(
    accelerator, predicted: torch.Tensor, true: torch.Tensor, class_names: list[str] | None
) -> dict[str, Any]:
    """Accuracy / F1 / confusion (classes) or MSE / MAE / Pearson (regression) over every
    process's predictions."""
    predicted, true = accelerator.gather_for_metrics((predicted, true))
    predicted, true = predicted.float().cpu().numpy(), true.float().cpu().numpy()
    if class_names is None:
        return regression_metrics(predicted, true)
    return classification_metrics(predicted.astype(int), true.astype(int), class_names)


class TaskHead(Objective):
    """A classification or regression head: loss per row; accuracy / F1 / confusion (or MSE,
    MAE, Pearson) per evaluation."""

    unit = "rows"

    def __init__(
        self, pad_id: int, class_names: list[str] | None, task_type: str, batching: Batching
    ) -> None:
        self.pad_id, self.class_names, self.task_type = pad_id, class_names, task_type
        self.lengths = batching.lengths
        self._predicted: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []
        self.last_metrics: dict[str, Any] | None = None
        """The last evaluation's metrics, confusion matrix included (for the summary)."""

    def collate(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        return collate_labeled(rows, self.pad_id)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return head_row_losses(head_outputs(model, batch), batch["labels"]).sum()

    def eval_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = head_outputs(model, batch)  # one forward for the loss and the predictions
        self._predicted.append(out if out.dim() == 1 else out.argmax(-1))
        self._true.append(batch["labels"])
        return head_row_losses(out, batch["labels"]).sum()

    def eval_metrics(self, accelerator: Accelerator, eval_loss: float) -> dict[str, float]:
        if not self._predicted:
            return {}
        predicted, true = torch.cat(self._predicted), torch.cat(self._true)
        self._predicted, self._true = [], []
        self.last_metrics = head_metrics(accelerator, predicted, true, self.class_names)
        # perplexity means nothing for a head; its metrics do
        return {f"eval_{k}": v for k, v in self.last_metrics.items() if isinstance(v, float)}

    def shown(self) -> dict[str, str]:
        floats = [k for k, v in (self.last_metrics or {}).items() if isinstance(v, float)]
        return {f"eval_{k}": k for k in floats}

    def audit_lines(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return audit_lines(data, tokenizer, self.task_type, self.class_names)

    def audit_record(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return audit_record(data, tokenizer, self.task_type, self.class_names)

    def summary(self, metrics: MetricsLog, plan: StepPlan, steps: int) -> dict[str, Any]:
        return {"eval_metrics": self.last_metrics}

    def describe(self) -> str:
        return "batching: padded" + (", grouped by length" if self.lengths is not None else "")
