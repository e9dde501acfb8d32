"""Evaluation in the training loop: the eval loss (through the run's objective), what the
objective, the forgetting report and generated answers add to it, one metrics line per
evaluation, and early stopping with the best adapter kept by the watched metric.

`held_out_loss` is the one loop that scores rows with an objective; the training loop, `peftkit
combine` and the benchmarks all measure their eval loss through it.

`Evaluation` is a part of `FineTuneRun` (training/loop.py), kept apart by responsibility; it
reads the run's accelerator, model, objective, data, state, metrics and recipe, and shows each part
of an evaluation as a phase of its own (`_phase`: a log line and the progress bar's label).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from peftkit.errors import RecipeError
from peftkit.objectives.batches import to_device
from peftkit.objectives.runtime import Objective
from peftkit.training.reference import reference_metrics


@torch.no_grad()
def held_out_sums(
    model: nn.Module,
    rows: list[Any],
    objective: Objective,
    batch_size: int,
    device: torch.device,
    joined_rows: int = 0,
    filler: Any = None,
) -> torch.Tensor:
    """(loss summed over units, units) of `rows` in batches of `batch_size`, a float32 tensor on
    `device`; the loss is the objective's `eval_loss_sum` (which may also collect predictions).

    Sharded weights are gathered by all processes together, so each must run as many forwards:
    with `joined_rows` (the most rows any process scores), batches past the end of `rows` run a
    forward of `filler` that only joins the others' gathering.
    """
    totals = torch.zeros(2, device=device)
    for i in range(0, max(len(rows), joined_rows), batch_size):
        if i >= len(rows):
            model(input_ids=objective.collate([filler])["input_ids"].to(device))
            continue
        batch = to_device(objective.collate(rows[i : i + batch_size]), device)
        totals[0] += objective.eval_loss_sum(model, batch)
        totals[1] += objective.units(batch).to(device)
    return totals


def held_out_loss(
    model: nn.Module,
    rows: list[Any],
    objective: Objective,
    batch_size: int,
    device: torch.device | str | None = None,
) -> float:
    """Mean loss per unit (supervised token, row, pair) of `rows` on one process, in eval mode
    (the model's mode is restored after). `device`: where batches go (default: the model's)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum, n = held_out_sums(model, rows, objective, batch_size, device).tolist()
    finally:
        model.train(was_training)
    return loss_sum / max(n, 1)


class Evaluation:
    """Evaluate, log and decide on early stopping (mixed into `FineTuneRun`)."""

    def evaluate(self, rows: list[Any] | None = None) -> float:
        """Mean loss per unit (supervised token, row, pair) over the eval rows, or `rows`
        (sharded over processes). The objective keeps what else it measured for `eval_metrics`."""
        acc, objective = self.accelerator, self.objective
        every = self.data.eval if rows is None else rows
        rows = every[acc.process_index :: acc.num_processes]
        if objective.sort_eval_by_length:
            rows = sorted(rows, key=lambda x: len(x.input_ids))
        # Sharded weights are gathered by all processes together: each runs as many forwards.
        joined = -(-len(every) // acc.num_processes) if self.launch.shards_state else 0
        self.model.eval()
        totals = held_out_sums(
            self.model,
            rows,
            objective,
            self.recipe.train.micro_batch_size,
            acc.device,
            joined,
            every[0],
        )
        self.model.train()
        loss_sum, n = acc.reduce(totals, "sum").tolist()
        return loss_sum / max(n, 1)

    def _eval_loss(self) -> float:
        """The eval loss over every eval row, shown as its own phase."""
        with self._phase(f"eval loss on {len(self.data.eval)} held-out rows"):
            return self.evaluate()

    def _evaluate_and_check_stop(self) -> bool:
        """Evaluate, log, keep the best adapter; True when early stopping says stop."""
        loss = self._eval_loss()
        self.last_eval = (self.state.step, loss)
        record = self._log_evaluation(loss)
        stopping = self.recipe.train.early_stopping
        min_delta = stopping.min_delta if stopping else 0.0
        value = self._watched(record)  # lower is better
        best = self.state.best_value
        if best is None and self.state.best_eval_loss is not None and value == loss:
            best = self.state.best_eval_loss  # a checkpoint from before best_value existed
        if best is None or value < best - min_delta:
            self.state.best_value, self.state.best_step = value, self.state.step
            self.state.best_eval_loss = loss
            self.state.evals_without_improvement = 0
            if self.recipe.output.save_best:
                with self._phase(f"saving the best adapter so far to {self.run.best.name}/"):
                    self._save_result(self.run.best)
        else:
            self.state.evals_without_improvement += 1
        return stopping is not None and self.state.evals_without_improvement >= stopping.patience

    def _watched(self, record: dict[str, Any]) -> float:
        """The early-stopping metric of an evaluation's record, signed so that lower is better."""
        stopping = self.recipe.train.early_stopping
        if stopping is None:
            return record["eval_loss"]
        if stopping.metric.startswith("answer_") and self.accelerator.num_processes > 1:
            # generated answers are scored on the main process: every rank takes its verdict
            shared = [record.get(stopping.metric)]
            broadcast_object_list(shared)
            record = {**record, stopping.metric: shared[0]}
        if stopping.metric not in record:
            known = ", ".join(k for k in record if k != "step")
            raise RecipeError(
                f"train.early_stopping.metric {stopping.metric!r} is not measured by this run's "
                f"evaluations; they log: {known}"
            )
        value = record[stopping.metric]
        return -value if stopping.higher_is_better else value

    def _log_evaluation(self, eval_loss: float | None) -> dict[str, Any]:
        """Log an evaluation: eval loss (overall and per task) and the reference loss, if any."""
        record: dict[str, Any] = {"step": self.state.step}
        shown = {"eval_loss": "eval loss", "reference_loss": "reference loss"}
        if eval_loss is not None:
            record["eval_loss"] = eval_loss
            record |= self.objective.eval_metrics(self.accelerator, eval_loss)
            shown |= self.objective.shown()
        if self.data.reference:
            # the base function at step 0: virtual tokens are not the identity, so switched off
            base = (
                self.accelerator.unwrap_model(self.model).disable_adapter()
                if self.state.step == 0 and self.recipe.adapter.virtual_tokens
                else contextlib.nullcontext()
            )
            label = f"forgetting: loss on {len(self.data.reference)} reference rows"
            with base, self._phase(label):
                record |= reference_metrics(self.evaluate(self.data.reference))
        if self.answers is not None and self.main:
            with self._phase(f"answering {len(self.answers.items)} held-out rows"):
                record |= self.answers(self.accelerator.unwrap_model(self.model))
            if self.state.step == 0:
                self.answers_before = self.answers.last_rows
            shown["answer_score"] = f"task metric ({self.recipe.eval.metric})"
        self.accelerator.wait_for_everyone()
        self.metrics.log(record)
        if eval_loss is not None and self.state.step == 0:
            self._watched(record)  # a metric no evaluation measures: say so now, not at step N
        if self.main and self.refresh_report is not None:
            self.refresh_report(self.run.path)
        self._print(
            f"step {self.state.step}: "
            + ", ".join(f"{name} {record[k]:.4f}" for k, name in shown.items() if k in record)
        )
        return record
