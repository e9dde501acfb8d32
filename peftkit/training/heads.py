"""Batches, loss and evaluation metrics of a task head (sequence classification / regression).

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
from torch import nn

from peftkit.data.labeled import LabeledRow


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
