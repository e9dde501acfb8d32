"""One optimizer step: the micro-batches' losses, backward, clipping, the update.

Loss normalisation: each optimizer step's loss is the sum of token losses over *all* supervised
tokens of the step (every micro-batch, every process) divided by their count, so gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from peftkit import _compat
from peftkit.data.encode import EncodedRow
from peftkit.errors import TrainingStopped
from peftkit.objectives.batches import to_device
from peftkit.objectives.runtime import Objective
from peftkit.training import advice

if TYPE_CHECKING:
    from peftkit.io import RunLayout
    from peftkit.recipe.schema import Recipe
    from peftkit.training.checkpoint import TrainerState
    from peftkit.training.update import Update


class OptimizerStep:
    """Runs the optimizer steps of a run; `updated_uncounted` is True between the update and
    the loop's counting of the step (an interrupt there leaves weights no checkpoint matches)."""

    def __init__(
        self,
        recipe: Recipe,
        accelerator: Accelerator,
        model: torch.nn.Module,
        objective: Objective,
        update: Update,
        scheduler: Any,
        state: TrainerState,
        run: RunLayout,
    ) -> None:
        self.recipe, self.accelerator, self.model, self.objective = (
            recipe,
            accelerator,
            model,
            objective,
        )
        self.update, self.scheduler, self.state, self.run = update, scheduler, state, run
        self.updated_uncounted = False

    def __call__(self, micro_batches: list[list[EncodedRow]], epoch: float) -> dict[str, Any]:
        """Run one optimizer step on `micro_batches` (this process's); its metrics record."""
        acc, r = self.accelerator, self.recipe
        objective = self.objective
        batches = objective.prepare_step(
            self.model, [objective.collate(rows) for rows in micro_batches], acc, self.state.step
        )
        self.state.largest_micro_batch_tokens = max(
            self.state.largest_micro_batch_tokens, *(b["input_ids"].numel() for b in batches)
        )
        local = torch.tensor(
            [
                float(sum(objective.units(b) for b in batches)),
                float(sum(objective.tokens(r, b) for r, b in zip(micro_batches, batches))),
            ],
            device=acc.device,
        )
        # n_supervised: the units the step's loss is a mean over (tokens, rows or pairs)
        n_supervised, n_tokens = (int(x) for x in acc.reduce(local, "sum").tolist())
        loss_sum = torch.zeros((), device=acc.device)
        try:
            for i, batch in enumerate(batches):
                batch = to_device(batch, acc.device)
                last = i == len(batches) - 1
                with self.update.no_sync(last):
                    token_loss_sum = objective.loss_sum(self.model, batch)
                    # DDP averages gradients over processes, hence the factor num_processes.
                    scaled = token_loss_sum * acc.num_processes / max(n_supervised, 1)
                    # the method's term, once a step (equal on every process: DDP's mean keeps it)
                    extra = r.adapter.extra_loss(acc.unwrap_model(self.model)) if last else None
                    self.update.backward(scaled if extra is None else scaled + extra, last)
                loss_sum += token_loss_sum.detach()
        except torch.OutOfMemoryError as e:
            raise TrainingStopped(
                advice.out_of_memory(self.recipe, self.state.step, self.run)
            ) from e
        loss = acc.reduce(loss_sum, "sum").item() / max(n_supervised, 1)
        if not math.isfinite(loss):
            self.update.zero_grad()
            raise TrainingStopped(
                advice.non_finite_step(
                    f"loss became {loss}", self.recipe, self.state.step, self.run, micro_batches
                )
            )
        grad_norm = self.update.grad_norm(r.train.max_grad_norm)  # before the update
        if not math.isfinite(grad_norm) and acc.scaler is None:  # fp16's scaler skips such steps
            self.update.zero_grad()
            raise TrainingStopped(
                advice.non_finite_step(
                    f"the gradients became non-finite (norm {grad_norm})",
                    self.recipe,
                    self.state.step,
                    self.run,
                    micro_batches,
                )
            )
        lr = self.scheduler.get_last_lr()[0]
        self.updated_uncounted = True
        self.update.step()
        self.scheduler.step()
        r.adapter.on_optimizer_step(acc.unwrap_model(self.model), self.state.step)
        self.update.zero_grad()
        if acc.device.type == "cpu":
            _compat.release_freed_cpu_memory()
        self.state.tokens_seen += n_tokens
        self.state.supervised_tokens_seen += n_supervised
        record = {
            "step": self.state.step + 1,
            "epoch": round(epoch, 4),
            "loss": loss,
            "lr": lr,
            "tokens": n_tokens,
            "supervised_tokens": n_supervised,
        }
        if r.train.max_grad_norm is not None:
            record["grad_norm"] = grad_norm
        record.update(objective.step_metrics(acc))
        return record
