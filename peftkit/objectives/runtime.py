"""The runtime of an objective, built once at setup (`ObjectiveKind.build`): it owns its collation,
loss, metrics and audit lines, so the training loop has no per-kind branches (as torchtune's
recipes inject their loss).

Every objective returns a loss *summed* over its units (supervised tokens for a causal LM, rows for
a task head, preference pairs or KTO rows) and says how many units a batch holds; the loop divides
the step's summed loss by the units of the whole step (every micro-batch, every process), so
gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.audit import audit_lines, audit_record
from peftkit.data.encode import EncodedRow
from peftkit.data.step_plan import StepPlan, TokenBudget
from peftkit.metrics import MetricsLog
from peftkit.objectives.loss import supervised_tokens


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
