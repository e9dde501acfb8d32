"""What a run optimises, chosen once at setup: the objective owns its collation, loss, metrics and
audit lines, so the training loop has no per-mode branches (as torchtune's recipes inject their
loss).

Every objective returns a loss *summed* over its units (supervised tokens for a causal LM, rows for
a task head, preference pairs or KTO rows) and says how many units a batch holds; the loop divides
the step's summed loss by the units of the whole step (every micro-batch, every process), so
gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.audit import audit_lines, audit_record
from peftkit.data.encode import EncodedRow
from peftkit.data.pipeline import PreparedData
from peftkit.data.step_plan import StepPlan, TokenBudget
from peftkit.kernels.linear_ce import fused_head
from peftkit.recipe.schema import DataSpec
from peftkit.training.batches import Batching, collate, collate_packed
from peftkit.training.heads import collate_labeled, head_metrics, head_outputs, head_row_losses
from peftkit.training.loss import causal_lm_loss_sum, supervised_tokens
from peftkit.training.metrics import MetricsLog
from peftkit.training.tasks import TaskLosses, task_summary


class Objective:
    """The interface the loop calls. Subclasses override what differs."""

    lengths: np.ndarray | None = None
    """Token length per training row, for length-grouped micro-batches (None = no grouping)."""
    budget: TokenBudget | None = None
    """Packed micro-batches cut by tokens (`train.micro_batch_tokens`)."""
    unit = "supervised tokens"
    varlen = False
    """Packed micro-batches carry row boundaries for the varlen attention (`attention.py`)."""
    sort_eval_by_length = True
    """Evaluate rows sorted by length (less padding); off where batch composition matters."""
    evaluate_at_start = False
    """Evaluate the held-out rows at step 0 even without `train.eval_every` (the summary's
    before -> after needs the start)."""

    def collate(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many units the batch's loss sums over."""
        return supervised_tokens(batch["labels"])

    def tokens(self, rows: list[Any], batch: dict[str, torch.Tensor] | None = None) -> int:
        """Real (unpadded) tokens of the rows (as `batch`, their collated micro-batch, holds
        them), for tokens/s."""
        return sum(len(row.input_ids) for row in rows)

    def prepare_step(
        self,
        model: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        accelerator: Accelerator,
        step: int,
    ) -> list[dict[str, torch.Tensor]]:
        """Work on a step's micro-batches that needs the model before their forwards (the
        rollouts of a reinforcement-learning objective); `step` is the optimizer step about to
        run. Default: none."""
        return batches

    def step_plan(self, plan: StepPlan) -> StepPlan:
        """The plan of which rows each optimizer step draws, as this objective consumes rows
        (GRPO's rollout reuse draws prompts once per generation). Default: the data's plan."""
        return plan

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def eval_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss under `torch.no_grad()` during evaluation (may also collect predictions)."""
        return self.loss_sum(model, batch)

    def step_metrics(self, accelerator: Accelerator) -> dict[str, float]:
        """Metrics accumulated by `loss_sum` since the last call (all processes), for the step."""
        return {}

    def eval_metrics(self, accelerator: Accelerator, eval_loss: float) -> dict[str, float]:
        """The evaluation's metrics beside eval_loss (collected by `eval_loss_sum`)."""
        return {}

    def shown(self) -> dict[str, str]:
        """Evaluation metrics worth a word in the printed line: {metric key: label}."""
        return {}

    def audit_lines(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return audit_lines(data, tokenizer, "causal_lm", None)

    def audit_record(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """data_audit.json (what report.html shows of the data)."""
        return audit_record(data, tokenizer, "causal_lm", None)

    def answer_rows(self, rows: list[Any]) -> list[EncodedRow]:
        """Held-out rows whose supervised answer generation-based evaluation asks for."""
        return rows

    def summary(self, metrics: MetricsLog, plan: StepPlan, steps: int) -> dict[str, Any]:
        """Entries of summary.json that only this objective has."""
        return {}

    def describe(self) -> str | None:
        return None

    def fused_head_status(self, model: nn.Module) -> dict[str, Any]:
        """Whether the loss runs the fused head and cross-entropy (`linear_ce.py`)."""
        return {"used": False, "reason": f"{type(self).__name__} scores from the logits"}

    def before_training(
        self, model: nn.Module, data: Any, batch_rows: int, accelerator: Accelerator, run: Any
    ) -> str | None:
        """Work the objective needs once the model is ready and before the first step (or the
        first step after a resume); returns a line for the user, if any."""
        return None


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
