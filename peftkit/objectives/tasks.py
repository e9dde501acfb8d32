"""Per-task losses of a multitask run: `loss/<task>` per step, `eval_loss/<task>` per evaluation.

Every row carries its task (`EncodedRow.task`). A micro-batch gets a `task_ids` tensor aligned
with its labels; the loss is then taken per token (`causal_lm_token_losses`) and each task's
token losses and supervised-token counts are summed, so

    loss/<task> = sum of the task's token losses / its supervised tokens (over the step or eval),

and the token-weighted mean of the per-task losses is the overall loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from peftkit.data.encode import IGNORE, EncodedRow, row_tasks
from peftkit.data.mixing import rows_drawn, task_shares
from peftkit.objectives.loss import causal_lm_token_losses

if TYPE_CHECKING:
    from accelerate import Accelerator

    from peftkit.data.pipeline import PreparedData
    from peftkit.data.spec import DataSpec
    from peftkit.data.step_plan import StepPlan
    from peftkit.metrics import MetricsLog


class TaskLosses:
    """Sums of token losses and supervised tokens per task, accumulated until `take`."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        self.totals = torch.zeros(2, len(names), dtype=torch.float64, device=device)

    @classmethod
    def for_data(cls, data: PreparedData, device: torch.device) -> TaskLosses | None:
        """A tracker when the train and eval rows span two tasks or more, else None."""
        names = list(dict.fromkeys([*row_tasks(data.train), *row_tasks(data.eval)]))
        return cls(names, device) if len(names) > 1 else None

    def tag(self, rows: list[EncodedRow], batch: dict[str, torch.Tensor]) -> None:
        """Add `task_ids` (task index per label position, -1 = none) to a collated batch."""
        ids = [self.index.get(row.task, -1) for row in rows]
        if max(ids) < 0:  # rows of no task (the reference set): plain loss
            return
        labels = batch["labels"]
        if "position_ids" in batch:  # packed: (1, tokens), rows one after another, filler last
            per_token = np.concatenate([np.full(len(r.input_ids), i) for r, i in zip(rows, ids)])
            task_ids = torch.full_like(labels, -1)
            task_ids[0, : len(per_token)] = torch.from_numpy(per_token)
        else:  # padded: (batch, seq), one task per row
            task_ids = torch.tensor(ids)[:, None].expand_as(labels).contiguous()
        batch["task_ids"] = task_ids

    def loss_sum(
        self, model: nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool
    ) -> torch.Tensor:
        """The micro-batch's summed token loss (for backward), adding each task's part."""
        task_ids = batch.pop("task_ids")[:, 1:]  # (batch, seq - 1): task of each target
        losses, keep = causal_lm_token_losses(model, batch, supervised_only)
        targets = batch["labels"][:, 1:]
        if keep is not None:
            task_ids, targets = task_ids[:, keep], targets[:, keep]
        mask = targets != IGNORE
        ids = task_ids[mask].to(self.totals.device)
        self.totals[0].index_add_(0, ids, losses.detach()[mask].to(torch.float64))
        self.totals[1].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        return losses.sum()

    def take(self, accelerator: Accelerator, prefix: str) -> dict[str, float]:
        """{`prefix/<task>`: mean loss per supervised token} since the last take (all processes)."""
        totals = accelerator.reduce(self.totals.clone(), "sum").tolist()
        self.totals.zero_()
        return {
            f"{prefix}/{name}": loss_sum / n
            for name, loss_sum, n in zip(self.names, *totals)
            if n > 0
        }


def task_summary(
    spec: DataSpec, data: PreparedData, plan: StepPlan, steps: int, metrics: MetricsLog
) -> dict[str, dict[str, Any]]:
    """Per task: rows, expected and actually drawn share of training rows, first/final eval loss."""
    train_tasks = row_tasks(data.train)
    drawn = rows_drawn(plan, steps)
    names = list(dict.fromkeys([*train_tasks, *(row.task for row in data.eval)]))
    counts = {t: int((train_tasks == t).sum()) for t in names if (train_tasks == t).any()}
    expected = task_shares(spec, counts)
    summary = {}
    for name in names:
        curve = metrics.series(f"eval_loss/{name}")
        n_drawn = int(drawn[train_tasks == name].sum())
        summary[name] = {
            "train_rows": counts.get(name, 0),
            "eval_rows": sum(row.task == name for row in data.eval),
            "drawn_rows": n_drawn,
            "drawn_share": round(n_drawn / max(int(drawn.sum()), 1), 4),
            "expected_share": round(expected.get(name, 0.0), 4),
            "first_eval_loss": curve[0][1] if curve else None,
            "final_eval_loss": curve[-1][1] if curve else None,
        }
    return summary
