"""The preference objectives' runtime (dpo.py, kto.py, orpo.py, simpo.py declare them): DPO
(sigmoid, ipo, hinge), KTO, ORPO and SimPO in peftkit's own loop.

A pair micro-batch is one padded batch of the chosen answers followed by the rejected ones
(`input_ids` (2 x pairs, seq)), as TRL builds it, so one forward scores both. The log-probability
of an answer is the sum over its supervised tokens: every token after the prompt, as TRL scores a
completion (`peftkit.data.preference.scored_after_prompt`).

The reference pi_ref (DPO, KTO) is the model as it started: for adapter methods the same weights
with the adapter switched off (no second copy), for full/partial fine-tuning a frozen copy taken
before the first step, or, with `precompute_ref: true`, log-probs computed once before training
and kept in the run directory (`reference_logps.safetensors`), so a resume does not recompute them.

Per step and per evaluation the objective logs TRL's metrics: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies (the preference accuracy), logps/chosen, logps/rejected, and
nll_loss / log_odds_ratio / log_odds_chosen (ORPO) or kl (KTO).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.encode import IGNORE, EncodedRow
from peftkit.data.preference import (
    PreferenceRow,
    preference_audit_lines,
    preference_audit_record,
    preferred_answers,
)
from peftkit.io import atomic_write_with
from peftkit.metrics import MetricsLog
from peftkit.objectives.batches import collate
from peftkit.objectives.loss import causal_lm_token_losses
from peftkit.objectives.preference_losses import dpo_losses, kto_losses, orpo_terms, simpo_losses
from peftkit.objectives.runtime import Objective

PAIR_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]
KTO_METRICS = ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"]


def sequence_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's supervised tokens (rows,), their number (rows,))."""
    losses, keep = causal_lm_token_losses(
        model,
        {k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
        supervised_only,
    )
    targets = batch["labels"][:, 1:]
    if keep is not None:
        targets = targets[:, keep.to(targets.device)]
    return -losses.sum(-1), (targets != IGNORE).sum(-1).to(losses.device)


class Preference(Objective):
    """The shared runtime of DPO / ORPO / SimPO (pairs: one padded micro-batch of the chosen
    answers followed by the rejected ones) and KTO (`KTOLoss` overrides what differs). A subclass
    gives its `pair_loss` and, where it differs, `uses_reference`, `extra_metrics`."""

    sort_eval_by_length = False  # KTO's KL rows pair neighbours; keep the data order
    evaluate_at_start = True  # the summary's preference figures before -> after
    unpaired: ClassVar[bool] = False
    uses_reference: ClassVar[bool] = True
    """The loss compares with a reference model (DPO, KTO); ORPO and SimPO have none."""
    extra_metrics: ClassVar[list[str]] = []
    """Metrics this loss logs beside the pair metrics."""
    unit = "pairs"

    def __init__(
        self,
        spec: Any,
        pad_id: int,
        supervised_only: bool,
        unwrap: Callable[[nn.Module], nn.Module],
        frozen_reference: nn.Module | None,
        lengths: np.ndarray | None = None,
    ) -> None:
        self.spec, self.pad_id, self.supervised_only, self.unwrap = (
            spec,
            pad_id,
            supervised_only,
            unwrap,
        )
        # Length grouping (train.packing false) reorders pairs within a step: the loss is a sum
        # over pairs, so the same (KTO, whose KL rows pair neighbours, keeps the order).
        self.lengths = lengths
        self.frozen = frozen_reference
        """Full/partial fine-tuning: the starting weights, frozen. None: the adapter switched off."""
        self.keys = self.metric_keys()
        self._sums: torch.Tensor | None = None  # (2, metrics): sums and counts

    def metric_keys(self) -> list[str]:
        return PAIR_METRICS + self.extra_metrics

    # ----------------------------------------------------------------- batches
    def collate(self, rows: list[PreferenceRow]) -> dict[str, torch.Tensor]:
        batch = collate([r.chosen for r in rows] + [r.rejected for r in rows], self.pad_id)
        refs = [r.ref_logps for r in rows]
        if all(ref is not None for ref in refs):
            batch["ref_logps"] = torch.tensor([ref[0] for ref in refs] + [ref[1] for ref in refs])
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def tokens(
        self, rows: list[PreferenceRow], batch: dict[str, torch.Tensor] | None = None
    ) -> int:
        return sum(r.n_tokens for r in rows)

    # ----------------------------------------------------------------- loss
    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_loss(model, batch)

    def pair_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's loss summed over its pairs (and `_add_pair_metrics` called)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- reference
    def _reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(torch.float32)
        with torch.no_grad():
            return self._run_reference(model, batch)

    def _run_reference(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.frozen is not None:
            return sequence_logps(self.frozen, batch, self.supervised_only)[0]
        with self.reference_context(model):
            return sequence_logps(self.unwrap(model), batch, self.supervised_only)[0]

    def reference_context(self, model: nn.Module):
        """The adapter switched off (peft), for the reference's forward."""
        inner = self.unwrap(model)
        return (
            inner.disable_adapter()
            if hasattr(inner, "disable_adapter")
            else contextlib.nullcontext()
        )

    @torch.no_grad()
    def precompute(
        self, model: nn.Module, splits: dict[str, list[PreferenceRow]], batch_rows: int, device
    ) -> dict[str, torch.Tensor]:
        """Reference log-probs of every row: {split: (rows, 2)} (KTO: second column unused)."""
        was_training = model.training
        model.eval()
        out = {}
        for name, rows in splits.items():
            values = []
            for i in range(0, len(rows), batch_rows):
                part = rows[i : i + batch_rows]
                seqs = [r.chosen for r in part] + [r.rejected for r in part if r.rejected]
                batch = {k: v.to(device) for k, v in collate(seqs, self.pad_id).items()}
                # the model as training starts (adapter on): the reference whatever the method
                logps = sequence_logps(self.unwrap(model), batch, self.supervised_only)[0]
                logps = logps.float().cpu()
                chosen = logps[: len(part)]
                rejected = logps[len(part) :] if not self.unpaired else torch.zeros(len(part))
                values.append(torch.stack([chosen, rejected], 1))
            out[name] = torch.cat(values) if values else torch.zeros(0, 2)
        model.train(was_training)
        return out

    def before_training(
        self, model: nn.Module, data: Any, batch_rows: int, accelerator: Accelerator, run: Any
    ) -> str | None:
        """`precompute_ref`: the reference log-probs of every row, once, kept in the run (a
        resume reads them)."""
        if not self.spec.precomputed_reference:
            return None
        splits = {"train": data.train, "eval": data.eval}
        path = run.reference_logps
        computed = load_or_compute_reference(self, model, splits, batch_rows, accelerator, path)
        accelerator.wait_for_everyone()
        return (
            "computed" if computed else "read"
        ) + f" reference log-probs of {len(data.train) + len(data.eval)} rows ({path.name})"

    # ----------------------------------------------------------------- metrics
    def _add_pair_metrics(
        self,
        r_chosen: torch.Tensor,
        r_rejected: torch.Tensor,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        pairs = torch.tensor(float(r_chosen.shape[0]))
        values = {
            "rewards/chosen": (r_chosen.sum(), pairs),
            "rewards/rejected": (r_rejected.sum(), pairs),
            "rewards/margins": ((r_chosen - r_rejected).sum(), pairs),
            "rewards/accuracies": ((r_chosen > r_rejected).float().sum(), pairs),
            "logps/chosen": (chosen.detach().sum(), pairs),
            "logps/rejected": (rejected.detach().sum(), pairs),
        }
        values |= {k: (v, pairs) for k, v in (extra or {}).items()}
        self._accumulate(values)

    def _accumulate(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        update = torch.tensor(
            [
                [float(values[k][0]) for k in self.keys],
                [float(values[k][1]) for k in self.keys],
            ],
            dtype=torch.float64,
        )
        self._sums = update if self._sums is None else self._sums + update

    def _take(self, accelerator: Accelerator, prefix: str) -> dict[str, float]:
        sums = (
            torch.zeros(2, len(self.keys), dtype=torch.float64)
            if self._sums is None
            else self._sums
        )
        self._sums = None
        sums, counts = accelerator.reduce(sums.to(accelerator.device), "sum").cpu().tolist()
        out = {f"{prefix}{k}": s / c for k, s, c in zip(self.keys, sums, counts) if c > 0}
        return out

    def step_metrics(self, accelerator: Accelerator) -> dict[str, float]:
        return self._take(accelerator, "")

    def eval_metrics(self, accelerator: Accelerator, eval_loss: float) -> dict[str, float]:
        return self._take(accelerator, "eval_")

    def shown(self) -> dict[str, str]:
        return {"eval_rewards/accuracies": "preference accuracy", "eval_rewards/margins": "margin"}

    # ----------------------------------------------------------------- the rest
    def summary(self, metrics: MetricsLog, plan: Any, steps: int) -> dict[str, Any]:
        """The held-out preference figures at step 0 (before) and at the last evaluation (after)."""
        out: dict[str, Any] = {"objective": self.spec.type}
        for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            curve = metrics.series(f"eval_{key}")
            if curve and curve[0][0] == 0:
                name = key.split("/")[1]
                out[f"eval_{name}_before"], out[f"eval_{name}_after"] = curve[0][1], curve[-1][1]
        return {"preference": out}

    def audit_lines(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return preference_audit_lines(data, tokenizer)

    def audit_record(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return preference_audit_record(data, tokenizer)

    def answer_rows(self, rows: list[PreferenceRow]) -> list[EncodedRow]:
        # generated answers are scored against the preferred (desirable) answer
        return preferred_answers(rows)

    def reference_name(self) -> str:
        return (
            "none"
            if not self.uses_reference
            else "precomputed log-probs"
            if self.spec.precomputed_reference
            else "frozen copy of the starting weights"
            if self.frozen is not None
            else "the base (adapter switched off)"
        )

    def loss_settings(self) -> str:
        """The knobs named in the describe line."""
        return f"beta {self.spec.beta}"

    def describe(self) -> str:
        return (
            f"objective: {self.spec.type} ({self.loss_settings()}); reference: "
            f"{self.reference_name()}; batching: padded, one micro-batch = chosen + rejected"
            + (", grouped by length" if self.lengths is not None else "")
        )


def load_or_compute_reference(
    objective: Preference,
    model: nn.Module,
    splits: dict[str, list[PreferenceRow]],
    batch_rows: int,
    accelerator: Accelerator,
    path: Path,
) -> bool:
    """Attach reference log-probs to every row (`row.ref_logps`), from `path` when it holds them
    for these rows, else computed now and written there. Returns whether they were computed."""
    saved = load_file(str(path)) if path.exists() else {}
    fits = all(name in saved and saved[name].shape[0] == len(rows) for name, rows in splits.items())
    values = saved if fits else objective.precompute(model, splits, batch_rows, accelerator.device)
    if not fits and accelerator.is_main_process:
        atomic_write_with(
            path, lambda tmp: save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
        )
    for name, rows in splits.items():
        for row, (c, r) in zip(rows, values[name].tolist()):
            row.ref_logps = (c, r)
    return not fits


def frozen_copy(model: nn.Module) -> nn.Module:
    """The starting weights as a frozen reference (full/partial fine-tuning)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class DPOLoss(Preference):
    """DPO's sigmoid, IPO or hinge loss on the policy's and the reference's log-ratios."""

    def pair_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, n = sequence_logps(model, batch, self.supervised_only)
        ref = self._reference_logps(model, batch)
        (chosen, rejected), (ref_c, ref_r), (n_c, n_r) = (
            logps.chunk(2),
            ref.chunk(2),
            n.chunk(2),
        )
        losses, r_c, r_r = dpo_losses(
            chosen, rejected, ref_c, ref_r, self.spec.beta, self.spec.loss_type, n_c, n_r
        )
        self._add_pair_metrics(r_c, r_r, chosen, rejected)
        return losses.sum()

    def loss_settings(self) -> str:
        return f"beta {self.spec.beta}, {self.spec.loss_type}"


class ORPOLoss(Preference):
    """ORPO: the chosen answers' NLL (prompt included, as TRL and the paper's code) minus beta
    times the log-sigmoid of the log odds ratio."""

    uses_reference = False
    extra_metrics = ["nll_loss", "log_odds_ratio", "log_odds_chosen"]

    def pair_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # ORPO's NLL term covers the prompt too (TRL and the paper's code)
        nll_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        losses, _ = causal_lm_token_losses(
            model,
            {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "labels": nll_labels,
            },
            False,
        )
        answer = batch["labels"][:, 1:] != IGNORE
        logps = -(losses * answer.to(losses.device)).sum(-1)
        n = answer.sum(-1).to(losses.device)
        nll_mask = nll_labels[:, 1:] != IGNORE
        token_losses, nll_mask = losses.chunk(2)[0], nll_mask.chunk(2)[0]
        chosen, rejected = (logps / n.clamp(min=1)).chunk(2)
        pairs = chosen.shape[0]
        nll = token_losses.sum() / nll_mask.sum().clamp(min=1)
        terms, r_c, r_r, log_odds = orpo_terms(chosen, rejected, self.spec.beta)
        extra = {
            "nll_loss": nll.detach() * pairs,
            "log_odds_ratio": (terms.detach() / self.spec.beta).sum(),
            "log_odds_chosen": log_odds.sum(),
        }
        self._add_pair_metrics(r_c, r_r, chosen, rejected, extra=extra)  # TRL: mean log-probs
        return pairs * nll - terms.sum()


class SimPOLoss(Preference):
    """SimPO on length-normalised log-probs, plus `sft_weight` times the chosen answers' NLL."""

    uses_reference = False
    extra_metrics = ["nll_loss"]

    def pair_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, n = sequence_logps(model, batch, self.supervised_only)
        chosen, rejected = (logps / n.clamp(min=1)).chunk(2)
        pairs = chosen.shape[0]
        losses, r_c, r_r = simpo_losses(chosen, rejected, self.spec.beta, self.spec.gamma)
        nll = -logps.chunk(2)[0].sum() / n.chunk(2)[0].sum().clamp(min=1)
        extra = {"nll_loss": nll.detach() * pairs}
        self._add_pair_metrics(r_c, r_r, chosen, rejected, extra=extra)  # TRL: mean log-probs
        return losses.sum() + self.spec.sft_weight * pairs * nll


class KTOLoss(Preference):
    """KTO: one row per micro-batch row (not pairs), a KL estimate from mismatched rows."""

    unpaired = True
    unit = "rows"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lengths = None  # the KL rows pair micro-batch neighbours: keep the order

    def metric_keys(self) -> list[str]:
        return KTO_METRICS

    def collate(self, rows: list[PreferenceRow]) -> dict[str, torch.Tensor]:
        batch = collate([r.chosen for r in rows], self.pad_id)
        batch["desirable"] = torch.tensor([bool(r.desirable) for r in rows])
        kl = collate(_mismatched(rows), self.pad_id)
        batch |= {f"kl_{k}": v for k, v in kl.items()}
        refs = [r.ref_logps for r in rows]
        if all(ref is not None for ref in refs):
            batch["ref_logps"] = torch.tensor([ref[0] for ref in refs])
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, _ = sequence_logps(model, batch, self.supervised_only)
        kl_batch = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
        with torch.no_grad():
            kl_policy, _ = sequence_logps(model, kl_batch, self.supervised_only)
            kl_ref = self._run_reference(model, kl_batch)
        ref = self._reference_logps(model, batch)
        kl = (kl_policy - kl_ref).mean().clamp(min=0).detach()
        desirable = batch["desirable"].to(logps.device)
        losses, rewards = kto_losses(
            logps,
            ref,
            desirable,
            kl,
            self.spec.beta,
            self.spec.desirable_weight,
            self.spec.undesirable_weight,
        )
        d, u = desirable, ~desirable
        values = {
            "rewards/chosen": (rewards[d].sum(), d.sum()),
            "rewards/rejected": (rewards[u].sum(), u.sum()),
            "logps/chosen": (logps.detach()[d].sum(), d.sum()),
            "logps/rejected": (logps.detach()[u].sum(), u.sum()),
            "kl": (kl, torch.ones(())),
        }
        self._accumulate(values)
        return losses.sum()

    def _take(self, accelerator: Accelerator, prefix: str) -> dict[str, float]:
        out = super()._take(accelerator, prefix)
        if f"{prefix}rewards/chosen" in out and f"{prefix}rewards/rejected" in out:
            out[f"{prefix}rewards/margins"] = (
                out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
            )
        return out

    def shown(self) -> dict[str, str]:
        return {"eval_rewards/margins": "reward margin"}

    def describe(self) -> str:
        return (
            f"objective: kto (beta {self.spec.beta}); reference: {self.reference_name()}; "
            "batching: padded"
        )


def _mismatched(rows: list[PreferenceRow]) -> list[EncodedRow]:
    """KTO's KL rows: prompt i with the answer of row i - 1 (rotated within the micro-batch, as TRL
    does), labels on the borrowed answer."""
    out = []
    for i, row in enumerate(rows):
        other = rows[i - 1].chosen
        prompt_end = _answer_start(row.chosen)
        answer_start = _answer_start(other)
        ids = np.concatenate([row.chosen.input_ids[:prompt_end], other.input_ids[answer_start:]])
        labels = np.concatenate(
            [np.full(prompt_end, IGNORE, dtype=np.int64), other.labels[answer_start:]]
        )
        out.append(EncodedRow(ids, labels, row.origin))
    return out


def _answer_start(row: EncodedRow) -> int:
    return int(np.argmax(row.labels != IGNORE))
