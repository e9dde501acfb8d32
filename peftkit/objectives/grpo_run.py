"""The GRPO objective in peftkit's own loop: roll out, score with rewards, optimise the clipped
surrogate (the math is in grpo_losses.py, equal to TRL 1.16's).

Each optimizer step takes `micro_batch_size x grad_accum` prompts per process, as any run does.
Before its micro-batches run forward, `prepare_step` samples `num_generations` completions of every
prompt with the live adapter (eval mode, a KV cache, no weight copy), stopping on the template's
stop tokens, scores them with the recipe's rewards and turns the rewards into advantages within
each prompt's group. Every group lives on one process, and each prompt's completions are sampled
with generators seeded by (train.seed, step, the row's origin), so a run on 2 processes draws the
very completions 1 process draws, and a resumed run those of the uninterrupted one.

The loop divides the step's summed loss by the step's units (all processes together); each loss
type's sum and unit make that quotient TRL's loss for equal micro-batches:
    grpo:    sum over completions of their token-mean loss; unit = a completion
    dr_grpo: token sum / max_completion_length; unit = a completion
    bnpo:    the micro-batch's token mean; unit = a micro-batch
    dapo:    token sum; unit = a completion token

Evaluation answers each held-out prompt greedily and scores the answer with the same rewards:
`eval_reward` (and `eval_rewards/<name>`); its eval "loss" is the negative mean reward, so early
stopping and best/ keep the adapter with the highest held-out reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit import _compat
from peftkit.data.prompts import PromptRow, prompt_audit_lines, prompt_audit_record
from peftkit.data.step_plan import StepPlan
from peftkit.metrics import MetricsLog
from peftkit.objectives.grpo_losses import completion_logps, group_advantages, policy_loss
from peftkit.objectives.rewards import Reward, reward_metrics, score
from peftkit.objectives.rollout_buffer import (
    Reuse,
    ReusePlan,
    load_buffer,
    prune_buffers,
    save_buffer,
)
from peftkit.objectives.rollouts import row_seed, sample_completions
from peftkit.objectives.runtime import Objective
from peftkit.objectives.shared_prefix import group_prompts, shared_prefix_logps, support_problem


class GRPORun(Objective):
    """The GRPO runtime: rollouts before each step's forwards, the clipped surrogate, rewards as
    metrics."""

    unit = "completions"
    sort_eval_by_length = True

    def __init__(
        self,
        spec: Any,  # the recipe's `objective:` section (grpo.GRPOObjective)
        rewards: list[Reward],
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: list[int],
        seed: int,
        unwrap: Callable[[nn.Module], nn.Module],
        frozen_reference: nn.Module | None,
        max_eval_tokens: int,
    ) -> None:
        self.spec, self.rewards, self.tokenizer = spec, rewards, tokenizer
        self.stop_ids, self.seed, self.unwrap = stop_ids, seed, unwrap
        self.frozen = frozen_reference
        """Full/partial fine-tuning with beta > 0: the starting weights. None: the adapter off."""
        self.max_eval_tokens = max_eval_tokens
        self.pad_id = tokenizer.pad_token_id
        self.unit = {
            "grpo": "completions",
            "dr_grpo": "completions",
            "bnpo": "micro-batches",
            "dapo": "completion tokens",
        }[spec.loss_type]
        self.weights = torch.tensor([r.weight for r in rewards])
        self._rows: dict[int, list[PromptRow]] = {}
        self._next_key = 0
        self.step = 0
        """The optimizer step being prepared (seeds the rollouts)."""
        self._stats: dict[str, list[float]] = {}
        self.reuse = Reuse(1, 1)
        """How a generation of rollouts serves optimizer steps (set by `step_plan`)."""
        self._buffer: tuple[int, list, list] | None = None
        """(generation step, slices, their statistics) under rollout reuse."""
        self._loss_sums = torch.zeros(5)  # kl, low clip, high clip, counted, kl tokens
        self._eval: dict[str, list[float]] = {}
        self.samples: list[dict[str, Any]] = []
        """The last step's first completions with their rewards (completions.jsonl in the run)."""
        self._completions: MetricsLog | None = None
        self._run: Any = None
        self._prefix: str | None = None
        """The forward's cache keyword when the training forward shares each group's prompt."""
        self.prefix_problem: str | None = "not set up"
        """Why the training forward runs row by row (None: it shares each group's prompt)."""

    # ----------------------------------------------------------------- batches
    def collate(self, rows: list[PromptRow]) -> dict[str, torch.Tensor]:
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids) :] = torch.as_tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        key, self._next_key = self._next_key, self._next_key + 1
        self._rows[key] = rows
        return {"input_ids": ids, "attention_mask": mask, "rows_key": torch.tensor(key)}

    def tokens(self, rows: list[PromptRow], batch: dict[str, torch.Tensor] | None = None) -> int:
        if batch is not None and "completion_mask" in batch:  # prompts x G, and the completions
            return int(batch["prompt_mask"].sum()) + int(batch["completion_mask"].sum())
        return sum(len(r.prompt_ids) for r in rows)

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "completion_mask" not in batch:  # evaluation: prompts
            return torch.tensor(batch["input_ids"].shape[0])
        if self.spec.loss_type == "bnpo":
            return torch.tensor(1)
        if self.spec.loss_type == "dapo":
            return self._loss_mask(batch).sum().cpu()
        return torch.tensor(batch["completion_ids"].shape[0])

    def _loss_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["completion_mask"]
        if self.spec.mask_truncated_completions:
            mask = mask * (~batch["truncated"]).unsqueeze(1).to(mask.dtype)
        return mask

    # ----------------------------------------------------------------- rollouts
    def prepare_step(
        self,
        model: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        accelerator: Accelerator,
        step: int,
    ) -> list[dict[str, torch.Tensor]]:
        """Sample, score and turn into advantages the completions of every prompt of the step
        (of the whole generation, under rollout reuse); a step that reuses a generation gets
        its slice of it (rollout_buffer.py)."""
        self.step = step
        if not self.reuse.generates(step):
            return self._buffered(batches, accelerator, step)
        inner = self.unwrap(model)
        was_training = inner.training
        inner.eval()
        out, tables, lengths, truncated, zero_std = [], [], [], [], []
        self.samples = []
        try:
            for batch in batches:
                rows = self._rows.pop(int(batch["rows_key"]))
                rolled, table, adv = self._rollout(inner, batch, rows, accelerator.device)
                out.append(rolled)
                tables.append(table)
                lengths.append(rolled["completion_mask"].sum(-1).float().cpu())
                truncated.append(rolled["truncated"].cpu())
                zero_std.append(adv.zero_std.cpu())
                if self.reuse.cycle > 1:  # the policy moves before these are used: keep pi_old
                    with torch.no_grad():
                        rolled["old_logps"] = self._logps(inner, rolled)
        finally:
            inner.train(was_training)
        if self.spec.scale_rewards == "batch":  # std over the whole generation, all processes
            self._rescale_by_batch(out, tables, accelerator)
        self._log_samples(step, accelerator)
        k = self.reuse.slices
        per = len(out) // k  # each slice: one optimizer step's micro-batches
        slices = [out[i * per : (i + 1) * per] for i in range(k)]
        stats = [
            {
                "table": torch.cat(tables[i * per : (i + 1) * per]),
                "lengths": torch.cat(lengths[i * per : (i + 1) * per]),
                "truncated": torch.cat(truncated[i * per : (i + 1) * per]).float(),
                "zero_std": torch.cat(zero_std[i * per : (i + 1) * per]).float(),
            }
            for i in range(k)
        ]
        if k > 1 and self.spec.loss_type == "dapo":
            self._dapo_scales(slices, accelerator)
        if self.reuse.cycle > 1:
            self._buffer = (step, slices, stats)
            if self._run is not None:
                folder = self._run.work / "rollouts"
                save_buffer(folder, step, accelerator.process_index, slices, stats)
                kept = self._run.complete_checkpoints()  # (the run directory, `training.run_dir`)
                prune_buffers(folder, kept, self.reuse, step)
        self._stats = {name: v.tolist() for name, v in stats[0].items()}
        return slices[0]

    def step_plan(self, plan: StepPlan) -> StepPlan:
        s = self.spec
        self.reuse = Reuse.of(s.steps_per_generation, s.num_iterations, plan.grad_accum)
        return ReusePlan(plan, self.reuse) if self.reuse.cycle > 1 else plan

    def _buffered(self, batches, accelerator: Accelerator, step: int):
        """The slice of the buffered generation that step `step` trains on (read back from the
        run's state folder by a run resumed inside the generation's cycle)."""
        for batch in batches:  # the slice's prompts, rolled out at the generation step
            self._rows.pop(int(batch["rows_key"]))
        start = self.reuse.generation_step(step)
        if self._buffer is None or self._buffer[0] != start:
            folder = self._run.work / "rollouts"
            self._buffer = (start, *load_buffer(folder, start, accelerator.process_index, step))
        _, slices, stats = self._buffer
        i = self.reuse.slice_of(step)
        self.samples = []
        self._stats = {name: v.tolist() for name, v in stats[i].items()}
        return slices[i]

    def _dapo_scales(self, slices, accelerator: Accelerator) -> None:
        """dapo normalises by the generation's completion tokens / k (TRL: num_items_in_batch x
        grad_accum / steps_per_generation) where the loop divides by the step's own: scale each
        slice's loss by the quotient (all processes' tokens)."""
        local = torch.stack([sum(self._loss_mask(b).sum() for b in sl) for sl in slices]).float()
        tokens = accelerator.reduce(local.to(accelerator.device), "sum")
        scales = tokens * len(slices) / tokens.sum().clamp(min=1.0)
        for sl, scale in zip(slices, scales):
            for b in sl:
                b["dapo_scale"] = scale.reshape(())

    def before_training(
        self, model: nn.Module, data: Any, batch_rows: int, accelerator: Accelerator, run: Any
    ) -> str | None:
        self._run = run
        inner = self.unwrap(model)
        self.prefix_problem = support_problem(inner, accelerator.distributed_type)
        self._prefix = None if self.prefix_problem else _compat.cache_keyword(inner)
        return None

    def _log_samples(self, step: int, accelerator: Accelerator) -> None:
        if self._run is None:
            return
        if self._completions is None:  # the first step run: a fresh run or a resume's
            self._completions = MetricsLog(
                self._run.completions, accelerator.is_main_process, step or None
            )
        self._completions.log({"step": step + 1, "samples": self.samples})

    def _rollout(
        self, model: nn.Module, batch: dict[str, torch.Tensor], rows: list[PromptRow], device
    ):
        g = self.spec.num_generations
        prompts, prompts_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        prompt_ids = prompts.repeat_interleave(g, dim=0)
        prompt_mask = prompts_mask.repeat_interleave(g, dim=0)
        seeds = [row_seed(self.seed, self.step, r.origin, j) for r in rows for j in range(g)]
        ids, mask, truncated = sample_completions(
            model,
            prompts,  # each prefilled once, its cache shared by its g samples
            prompts_mask,
            seeds,
            self.spec.max_completion_length,
            self.stop_ids,
            self.pad_id,
            self.spec.temperature,
            self.spec.top_p,
            self.spec.top_k,
            group=g,
            min_new_tokens=self.spec.min_completion_length,
        )
        expanded = [r for r in rows for _ in range(g)]
        texts = [
            self.tokenizer.decode(ids[i][mask[i].bool()].tolist(), skip_special_tokens=True)
            for i in range(len(expanded))
        ]
        table = self._score(expanded, texts, ids, mask)
        adv = group_advantages(table, self.weights, g, self.spec.scale_rewards)
        rolled = {
            "input_ids": torch.cat([prompt_ids, ids], dim=1),
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": ids,
            "completion_mask": mask,
            "truncated": truncated,
            "advantages": adv.advantages.to(device),
        }
        if self.spec.beta != 0.0:
            rolled["ref_logps"] = self._reference_logps(model, rolled)
        for i in range(min(len(expanded), 2 * g) if not self.samples else 0):
            self.samples.append(
                {
                    "origin": expanded[i].origin,
                    "completion": texts[i],
                    "rewards": {r.name: table[i, j].item() for j, r in enumerate(self.rewards)},
                    "advantage": adv.advantages[i].item(),
                }
            )
        return rolled, table, adv

    def _score(self, rows: list[PromptRow], texts: list[str], ids, mask) -> torch.Tensor:
        columns: dict[str, list[Any]] = {}
        for name in dict.fromkeys(k for r in rows for k in r.columns):
            columns[name] = [r.columns.get(name) for r in rows]
        return score(
            self.rewards,
            prompts=[r.prompt for r in rows],
            completions=texts,
            completion_ids=[ids[i][mask[i].bool()].tolist() for i in range(len(rows))],
            columns=columns,
            origins=[r.origin for r in rows],
            conversational=rows[0].conversational,
        )

    def _rescale_by_batch(self, out, tables, accelerator: Accelerator) -> None:
        rewards = [
            (t * self.weights.unsqueeze(0)).nansum(1).masked_fill(torch.isnan(t).all(1), math.nan)
            for t in tables
        ]
        every = torch.tensor(gather_object(torch.cat(rewards).tolist()))
        std = torch.tensor(float(torch.std(every[~torch.isnan(every)])))
        for rolled, r in zip(out, rewards):
            mean = torch.nanmean(r.view(-1, self.spec.num_generations), 1)
            adv = (r - mean.repeat_interleave(self.spec.num_generations)) / (std + 1e-4)
            rolled["advantages"] = torch.nan_to_num(adv, nan=0.0).to(rolled["advantages"].device)

    def _logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) completion log-probs: each group's prompt run once (shared_prefix.py), or
        row by row where that cannot run (`prefix_problem`)."""
        if self._prefix is not None:
            g = self.spec.num_generations
            ids, mask = group_prompts(batch["prompt_ids"], batch["prompt_mask"], g)
            return shared_prefix_logps(
                model,
                ids,
                mask,
                batch["completion_ids"],
                batch["completion_mask"],
                g,
                self.spec.temperature,
                self._prefix,
            )
        return completion_logps(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
            self.spec.temperature,
        )

    @torch.no_grad()
    def _reference_logps(self, model: nn.Module, rolled: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.frozen is not None:
            return self._logps(self.frozen, rolled)
        with model.disable_adapter():
            return self._logps(model, rolled)

    # ----------------------------------------------------------------- loss
    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.spec
        mask = self._loss_mask(batch)
        logps = self._logps(model, batch)
        out = policy_loss(
            logps,
            batch.get("old_logps"),  # None: used in the step that sampled it, pi_old = pi
            batch.get("ref_logps"),
            batch["advantages"],
            mask,
            loss_type=s.loss_type,
            beta=s.beta,
            epsilon=s.epsilon,
            epsilon_high=s.epsilon_high,
            importance_sampling_level=s.importance_sampling_level,
            max_completion_length=s.max_completion_length,
            generation_batch_tokens=torch.ones((), device=logps.device),
            use_bias_correction_kl=s.use_bias_correction_kl,
        )
        self._loss_sums += (
            torch.stack([out.kl_sum, out.low_clipped, out.high_clipped, out.counted, mask.sum()])
            .cpu()
            .float()
        )
        if s.loss_type in ("grpo", "dr_grpo"):  # a mean over the micro-batch's completions
            return out.loss * batch["completion_ids"].shape[0]
        if "dapo_scale" in batch:
            return out.loss * batch["dapo_scale"]
        return out.loss  # bnpo: one micro-batch's mean; dapo: the token sum (normaliser 1)

    def step_metrics(self, accelerator: Accelerator) -> dict[str, float]:
        """TRL's per-step names: reward, reward_std, rewards/<name>/mean and /std,
        frac_reward_zero_std, completions/{mean,min,max}_length, completions/clipped_ratio,
        clip_ratio/{low,high,region}_mean and kl (beta > 0)."""
        gathered = {k: gather_object(v) for k, v in self._stats.items()}
        sums = accelerator.reduce(self._loss_sums.to(accelerator.device), "sum").tolist()
        self._loss_sums.zero_()
        table = torch.tensor(gathered["table"], dtype=torch.float32).view(-1, len(self.rewards))
        total = (table * self.weights.unsqueeze(0)).nansum(1)
        total = total[~torch.isnan(table).all(1)]
        lengths = torch.tensor(gathered["lengths"])
        counted = max(sums[3], 1.0)
        out = {
            "reward": total.mean().item() if total.numel() else math.nan,
            "reward_std": total.std().item() if total.numel() > 1 else 0.0,
            **reward_metrics(table, self.rewards),
            "frac_reward_zero_std": sum(gathered["zero_std"]) / max(len(gathered["zero_std"]), 1),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": sum(gathered["truncated"]) / max(lengths.numel(), 1),
            "clip_ratio/low_mean": sums[1] / counted,
            "clip_ratio/high_mean": sums[2] / counted,
            "clip_ratio/region_mean": (sums[1] + sums[2]) / counted,
        }
        if self.spec.beta != 0.0:
            out["kl"] = sums[0] / max(sums[4], 1.0)
        return out

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Greedy answers to the held-out prompts, scored by the rewards: minus their summed
        reward (so that lower is better, as for a loss)."""
        rows = self._rows.pop(int(batch["rows_key"]))
        inner = self.unwrap(model)
        ids, mask, _ = sample_completions(
            inner,
            batch["input_ids"],
            batch["attention_mask"],
            [0] * len(rows),
            self.max_eval_tokens,
            self.stop_ids,
            self.pad_id,
            greedy=True,
        )
        texts = [
            self.tokenizer.decode(ids[i][mask[i].bool()].tolist(), skip_special_tokens=True)
            for i in range(len(rows))
        ]
        table = self._score(rows, texts, ids, mask)
        total = (table * self.weights.unsqueeze(0)).nansum(1)
        self._eval.setdefault("table", []).extend(table.tolist())
        return -total.sum().to(batch["input_ids"].device)

    def eval_metrics(self, accelerator: Accelerator, eval_loss: float) -> dict[str, float]:
        rows = gather_object(self._eval.pop("table", []))
        table = torch.tensor(rows, dtype=torch.float32).view(-1, len(self.rewards))
        per = {
            f"eval_{k}": v
            for k, v in reward_metrics(table, self.rewards).items()
            if k.endswith("/mean")
        }
        return {"eval_reward": -eval_loss, **per}

    def shown(self) -> dict[str, str]:
        return {"eval_reward": "held-out reward (greedy)"}

    # ----------------------------------------------------------------- reporting
    def audit_lines(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return prompt_audit_lines(data, tokenizer)

    def audit_record(self, data: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return prompt_audit_record(data, tokenizer)

    def answer_rows(self, rows: list[PromptRow]) -> list[Any]:
        # eval.metric: the greedy answer against the row's reference answer (rows without one
        # are scored on every token, so the answer evaluation skips them)
        return [r.scored for r in rows]

    def summary(self, metrics: MetricsLog, plan: Any, steps: int) -> dict[str, Any]:
        """Mean reward per step (first and last) and the held-out reward before -> after."""
        out: dict[str, Any] = {
            "loss_type": self.spec.loss_type,
            "rewards": [r.name for r in self.rewards],
            # what the training forward ran: each group's prompt once, or every row whole
            "shared_prefix": self.prefix_problem is None,
        }
        if self.prefix_problem:
            out["shared_prefix_off"] = self.prefix_problem
        train = metrics.series("reward")
        if train:
            out["train_reward_first"], out["train_reward_last"] = train[0][1], train[-1][1]
        held = metrics.series("eval_reward")
        if held:
            out["eval_reward_before"], out["eval_reward_after"] = held[0][1], held[-1][1]
        return {"grpo": out}

    def describe(self) -> str:
        s = self.spec
        ref = (
            "none (beta 0)"
            if s.beta == 0
            else "frozen copy of the starting weights"
            if self.frozen is not None
            else "the base (adapter switched off)"
        )
        return (
            f"rollouts: {s.num_generations} completions per prompt, up to "
            f"{s.max_completion_length} tokens, temperature {s.temperature}; loss {s.loss_type}, "
            f"beta {s.beta}; reference: {ref}; rewards: "
            + ", ".join(f"{r.name} x{r.weight:g}" for r in self.rewards)
            + (
                f"; each generation fills {s.steps_per_generation or 'grad_accum'} micro-batches "
                f"and is optimised {s.num_iterations} times"
                if s.num_iterations > 1 or s.steps_per_generation
                else ""
            )
        )
