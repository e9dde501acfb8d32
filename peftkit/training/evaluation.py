"""Evaluation in the training loop: the eval loss (through the run's objective), what the
objective, the forgetting report and generated answers add to it, one metrics line per
evaluation, and early stopping with the best adapter kept by the watched metric.

`held_out_loss` is the one loop that scores rows with an objective; the training loop, `peftkit
combine` and the benchmarks all measure their eval loss through it.

`Evaluator` scores the run's eval rows (and the forgetting report's reference rows) and
`EarlyStopping` keeps the best evaluation; each is handed what it reads. What else an evaluation
measures comes from the run's callbacks (training/callbacks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from peftkit.errors import RecipeError
from peftkit.objectives.batches import to_device
from peftkit.objectives.runtime import Objective

if TYPE_CHECKING:
    from peftkit.metrics import MetricsLog
    from peftkit.recipe.schema import EarlyStoppingSpec
    from peftkit.training.callbacks import Callback
    from peftkit.training.checkpoint import TrainerState


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


class Evaluator:
    """The eval loss of rows through the run's objective, sharded over processes."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        rows: list[Any],
        accelerator: Accelerator,
        batch_size: int,
        shards_state: bool,
    ) -> None:
        """`rows`: the eval rows; `shards_state`: the weights are sharded (FSDP / DeepSpeed 3),
        so every process runs as many forwards."""
        self.model, self.objective, self.rows = model, objective, rows
        self.accelerator, self.batch_size, self.shards_state = accelerator, batch_size, shards_state

    def __call__(self, rows: list[Any] | None = None) -> float:
        """Mean loss per unit (supervised token, row, pair) over the eval rows, or `rows`
        (sharded over processes). The objective keeps what else it measured for `eval_metrics`."""
        acc, objective = self.accelerator, self.objective
        every = self.rows if rows is None else rows
        rows = every[acc.process_index :: acc.num_processes]
        if objective.sort_eval_by_length:
            rows = sorted(rows, key=lambda x: len(x.input_ids))
        # Sharded weights are gathered by all processes together: each runs as many forwards.
        joined = -(-len(every) // acc.num_processes) if self.shards_state else 0
        self.model.eval()
        totals = held_out_sums(
            self.model, rows, objective, self.batch_size, acc.device, joined, every[0]
        )
        self.model.train()
        loss_sum, n = acc.reduce(totals, "sum").tolist()
        return loss_sum / max(n, 1)


class EarlyStopping:
    """Keep the best evaluation by the watched metric (`train.early_stopping.metric`, else the
    eval loss) in the run's state, and say when patience has run out."""

    def __init__(
        self, spec: EarlyStoppingSpec | None, state: TrainerState, accelerator: Accelerator
    ) -> None:
        self.spec, self.state, self.accelerator = spec, state, accelerator

    def update(self, record: dict[str, Any]) -> tuple[bool, bool]:
        """(improved: the best so far, stop: patience ran out) after the evaluation `record`."""
        loss = record["eval_loss"]
        value = self.watched(record)  # lower is better
        best = self.state.best_value
        if best is None and self.state.best_eval_loss is not None and value == loss:
            best = self.state.best_eval_loss  # a checkpoint from before best_value existed
        improved = best is None or value < best - (self.spec.min_delta if self.spec else 0.0)
        if improved:
            self.state.best_value, self.state.best_step = value, self.state.step
            self.state.best_eval_loss = loss
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
        stop = self.spec is not None and self.state.evals_without_improvement >= self.spec.patience
        return improved, stop

    def watched(self, record: dict[str, Any]) -> float:
        """The early-stopping metric of an evaluation's record, signed so that lower is better."""
        stopping = self.spec
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


class Evaluations:
    """The run's evaluations: the eval loss, what the callbacks add (`on_eval`), one metrics
    record, then `after_eval`; the best adapter kept and early stopping decided."""

    def __init__(
        self,
        evaluate: Evaluator,
        objective: Objective,
        accelerator: Accelerator,
        state: TrainerState,
        metrics: MetricsLog,
        callbacks: Sequence[Callback],
        stopping: EarlyStopping,
        save_best: Callable[[], None] | None,
        phase: Callable[[str], AbstractContextManager[None]],
        show: Callable[[str], None],
    ) -> None:
        """`save_best()` writes the best adapter (None: output.save_best is off); `phase(label)`:
        a labelled stretch of work between steps; `show(text)`: a log line on the main process."""
        self.evaluate, self.objective, self.accelerator = evaluate, objective, accelerator
        self.state, self.metrics, self.callbacks, self.stopping = (
            state,
            metrics,
            callbacks,
            stopping,
        )
        self.save_best, self.phase, self.show = save_best, phase, show
        self.last: tuple[int, float] | None = None
        """(step, eval loss) of the last evaluation with an eval loss."""

    def loss(self) -> float:
        """The eval loss over every eval row, shown as its own phase."""
        with self.phase(f"eval loss on {len(self.evaluate.rows)} held-out rows"):
            return self.evaluate()

    def evaluate_and_check_stop(self) -> bool:
        """Evaluate, log, keep the best adapter; True when early stopping says stop."""
        loss = self.loss()
        self.last = (self.state.step, loss)
        improved, stop = self.stopping.update(self.log(loss))
        if improved and self.save_best is not None:
            with self.phase("saving the best adapter so far to best/"):
                self.save_best()
        return stop

    def log(self, eval_loss: float | None) -> dict[str, Any]:
        """Log an evaluation: the eval loss (overall and per task), and what the callbacks add."""
        step = self.state.step
        record: dict[str, Any] = {"step": step}
        shown = {"eval_loss": "eval loss"}
        if eval_loss is not None:
            record["eval_loss"] = eval_loss
            record |= self.objective.eval_metrics(self.accelerator, eval_loss)
            shown |= self.objective.shown()
        for callback in self.callbacks:
            callback.on_eval(step, record)
            shown |= callback.shown
        self.accelerator.wait_for_everyone()
        self.metrics.log(record)
        if eval_loss is not None and step == 0:
            self.stopping.watched(record)  # a metric no evaluation measures: say so now
        for callback in self.callbacks:
            callback.after_eval(step, record)
        self.show(
            f"step {step}: "
            + ", ".join(f"{name} {record[k]:.4f}" for k, name in shown.items() if k in record)
        )
        return record
