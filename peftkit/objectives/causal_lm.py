"""The runtimes of a causal LM's supervised fine-tuning (sft.py) and of its multitask form
(multitask.py): padded or packed micro-batches, the summed token cross-entropy."""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from peftkit.data.encode import EncodedRow
from peftkit.data.pipeline import PreparedData
from peftkit.data.spec import DataSpec
from peftkit.data.step_plan import StepPlan
from peftkit.kernels.linear_ce import fused_head
from peftkit.metrics import MetricsLog
from peftkit.objectives.base import BuildContext
from peftkit.objectives.batches import Batching, choose_batching, collate, collate_packed
from peftkit.objectives.loss import causal_lm_loss_sum
from peftkit.objectives.runtime import Objective
from peftkit.objectives.tasks import TaskLosses, task_summary


def run_batching(ctx: BuildContext, token_loss: bool = True) -> Batching:
    """The run's batching for this model (`choose_batching`)."""
    r = ctx.recipe
    return choose_batching(r.train, r.adapter, ctx.model, token_loss, ctx.precision, ctx.data.train)


class CausalLM(Objective):
    """Next-token cross-entropy on supervised tokens; padded or packed micro-batches."""

    def __init__(self, batching: Batching, pad_id: int) -> None:
        self.batching, self.pad_id = batching, pad_id
        self.lengths, self.budget = batching.lengths, batching.budget
        self.varlen = batching.varlen

    def fused_head_status(self, model: nn.Module) -> dict[str, Any]:
        if not self.batching.supervised_only:
            return {"used": False, "reason": "logits at every position (supervised_logits_only)"}
        if fused_head(model) is None:
            return {
                "used": False,
                "reason": "the logits are not a plain linear head of the last "
                "hidden state (linear_ce.FUSED_HEAD_TYPES)",
            }
        return {"used": True}

    @classmethod
    def padded(cls, pad_id: int) -> CausalLM:
        """Padded micro-batches, logits at every position: rows scored outside a run (combine's
        evaluation, the benchmarks) the same way whatever the model allows."""
        return cls(Batching(False, False, False, 1, None), pad_id)

    def collate(self, rows: list[EncodedRow]) -> dict[str, torch.Tensor]:
        b = self.batching
        if b.packing:
            return collate_packed(rows, b.varlen, b.pack_multiple, self.pad_id)
        return collate(rows, self.pad_id)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch, self.batching.supervised_only)

    def eval_metrics(self, accelerator: Accelerator, eval_loss: float) -> dict[str, float]:
        return {"eval_ppl": math.exp(min(eval_loss, 50))}

    def describe(self) -> str:
        return self.batching.describe()


class Multitask(CausalLM):
    """A causal LM over several tasks: also `loss/<task>` per step and `eval_loss/<task>`."""

    def __init__(
        self,
        batching: Batching,
        pad_id: int,
        task_losses: TaskLosses,
        spec: DataSpec,
        data: PreparedData,
    ) -> None:
        super().__init__(batching, pad_id)
        self.task_losses, self.spec, self.data = task_losses, spec, data

    def summary(self, metrics: MetricsLog, plan: StepPlan, steps: int) -> dict[str, Any]:
        """Per task: rows, drawn share against the expected one, first/final eval loss."""
        return {"tasks": task_summary(self.spec, self.data, plan, steps, metrics)}

    def collate(self, rows: list[EncodedRow]) -> dict[str, torch.Tensor]:
        batch = super().collate(rows)
        self.task_losses.tag(rows, batch)
        return batch

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "task_ids" in batch:
            return self.task_losses.loss_sum(model, batch, self.batching.supervised_only)
        return super().loss_sum(model, batch)  # rows of no task: the reference set

    def step_metrics(self, accelerator: Accelerator) -> dict[str, float]:
        return self.task_losses.take(accelerator, "loss")

    def fused_head_status(self, model: nn.Module) -> dict[str, Any]:
        return {"used": False, "reason": "per-task losses are computed from the logits"}

    def eval_metrics(self, accelerator: Accelerator, eval_loss: float) -> dict[str, float]:
        return super().eval_metrics(accelerator, eval_loss) | self.task_losses.take(
            accelerator, "eval_loss"
        )
