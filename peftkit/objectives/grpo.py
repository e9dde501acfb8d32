"""Group Relative Policy Optimization (`objective: {type: grpo}`) in peftkit's own loop: roll out, score with rewards, optimise the clipped
surrogate (the math is in grpo_losses.py, equal to TRL 1.16's).
The runtime (rollouts, rewards, the clipped surrogate) is `peftkit.objectives.grpo_run.GRPORun`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from peftkit.data.pipeline import PreparedData
from peftkit.data.prompts import PromptRow, prepare_prompt_data
from peftkit.objectives.base import BuildContext, ObjectiveKind, RecipeView, Support
from peftkit.objectives.registry import register
from peftkit.objectives.sft import causal_lm_rules
from peftkit.section import Section

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from peftkit.objectives.runtime import Objective


class RewardSpec(Section):
    """One reward of a reinforcement-learning objective: a Python function or a task metric,
    weighted. A function has TRL's reward signature, `fn(prompts, completions, completion_ids,
    **columns) -> list[float | None]`, each column of the data row passed as a list, so reward
    functions written for TRL's GRPOTrainer work unchanged; None = this function does not score
    that completion."""

    function: str | None = None
    """`module:function` or `path/to/file.py:function` (relative to the recipe's folder first)."""
    metric: Literal["exact", "contains", "json_fields", "tool_call"] | None = None
    """A task metric as the reward, scored against the row's `reference` column (tool_call: the
    completion's calls, in the chat template's call format, against the reference's: a call as
    the template writes it, or OpenAI `tool_calls` / a {"name", "arguments"} object)."""
    reference: str = "answer"
    """The data column a `metric` reward compares each completion with."""
    weight: float = 1.0
    """Weight in the summed reward (TRL: reward_weights)."""
    name: str | None = None
    """Name in the logged metrics (`rewards/<name>/mean`); null = the function's or metric's name."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.function is None) == (self.metric is None):
            raise ValueError("a reward names exactly one of `function` or `metric`")
        return self

    @property
    def label(self) -> str:
        """The name its metrics are logged under."""
        if self.name:
            return self.name
        return self.metric or (self.function or "").rpartition(":")[2]


class GRPOObjective(Section):
    """Group Relative Policy Optimization (Shao et al. 2024) with Python rewards, as TRL's
    GRPOTrainer defines it (its knob names and defaults). For each prompt the live policy samples
    `num_generations` completions; each completion's advantage is its summed reward minus its
    group's mean, over the group's std (`scale_rewards`); the loss is PPO's clipped surrogate on
    the per-token probability ratio to the sampling policy, plus beta times the k3 KL to the
    reference (the adapter switched off), reduced over tokens by `loss_type`
    (peftkit/objectives/grpo_losses.py has the formulas)."""

    type: Literal["grpo"]
    rewards: Annotated[list[RewardSpec], Field(min_length=1)]
    """Reward functions and metrics; the reward of a completion is their weighted sum."""
    num_generations: int = Field(default=8, ge=2)
    """Completions sampled per prompt (the group); `train.micro_batch_size` counts prompts."""
    max_completion_length: int = Field(default=512, gt=0)
    """Most tokens generated per completion; a completion cut there is `truncated`."""
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    """0 = no top-k cut."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """How per-token losses are averaged: grpo = per sequence, then over sequences; bnpo = over
    the micro-batch's tokens; dr_grpo = over sequences x max_completion_length; dapo = over the
    step's completion tokens."""
    beta: float = Field(default=0.0, ge=0)
    """Weight of the KL to the reference; 0 = no reference forward."""
    epsilon: float = Field(default=0.2, gt=0)
    """Lower clipping range of the probability ratio (and upper, unless epsilon_high)."""
    epsilon_high: float | None = Field(default=None, gt=0)
    """Upper clipping range (DAPO's clip-higher recommends 0.28)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the std of the group's rewards, of the whole batch's, or not at all
    (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token = one probability ratio per token; sequence = one per completion (GSPO)."""
    use_bias_correction_kl: bool = True
    """Weight the KL term by the probability ratio (unbiased reverse-KL gradient, TRL's default)."""
    num_iterations: int = Field(default=1, ge=1)
    """Optimizer passes over each generation of rollouts (TRL's num_iterations, the paper's mu).
    Above 1 each prompt is drawn once per num_iterations passes, the rollouts' log-probs are
    kept from generation time and the ratio to them is clipped (epsilon)."""
    steps_per_generation: int | None = Field(default=None, ge=1)
    """Micro-batches one generation of rollouts fills (TRL's steps_per_generation); null =
    train.grad_accum, fresh rollouts every optimizer step. A multiple of train.grad_accum: a
    generation then serves steps_per_generation / grad_accum optimizer steps (times
    num_iterations), one slice of it each."""
    min_completion_length: int = Field(default=0, ge=0)
    """Stop tokens cannot be sampled before this many tokens (0 = off). Not a TRL knob (there:
    `generation_kwargs: {min_new_tokens: N}`); it exists so that a benchmark can make every
    completion exactly max_completion_length long, i.e. runs do equal work."""

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    @property
    def reference_column(self) -> str:
        """The column holding each row's reference answer (what a metric reward and the eval
        metric compare with)."""
        return next((r.reference for r in self.rewards if r.metric is not None), "answer")


class GRPO(ObjectiveKind):
    """Group Relative Policy Optimization with Python rewards (`objective: {type: grpo}`)."""

    name = "grpo"
    spec = GRPOObjective
    row_type = PromptRow
    caches_rows = False  # (its rows carry the data's own columns for the reward functions)
    support = Support(
        plan="rollouts of num_generations completions per prompt with a KV cache, reference "
        "forwards",
        sharded="samples completions on each process, which a model split over processes "
        "cannot do yet: launch it with DDP",
    )
    summary_line = "Group Relative Policy Optimization: sampled completions scored by rewards."

    @classmethod
    def rules(cls, recipe: RecipeView) -> list[str]:
        kind = "objective grpo"
        problems = causal_lm_rules(recipe)
        if recipe.task.type != "causal_lm":
            problems.append(f"{kind} trains a causal LM's completions; task.type must be causal_lm")
        if recipe.train.packing:
            problems.append(f"train.packing: {kind} rolls out padded batches; remove it")
        if recipe.data.reference:
            problems.append(
                f"data.reference: the forgetting report is for sft runs, not {kind} yet; remove it"
            )
        if recipe.data.mixing.strategy != "concat":
            problems.append(f"data.mixing: {kind} reads one prompt set; remove data.mixing")
        spg, accum = recipe.objective.steps_per_generation, recipe.train.grad_accum
        if spg is not None and spg % accum:
            problems.append(
                f"objective.steps_per_generation {spg}: one generation fills whole optimizer "
                f"steps here, so it must be a multiple of train.grad_accum ({accum}): set "
                f"{max(accum, spg - spg % accum)} or {spg - spg % accum + accum}"
            )
        if recipe.objective.min_completion_length > recipe.objective.max_completion_length:
            problems.append(
                "objective.min_completion_length: above max_completion_length "
                f"({recipe.objective.max_completion_length}); lower it"
            )
        if recipe.output.sample_prompts:
            problems.append(
                f"output.sample_prompts: {kind} reports its held-out reward and keeps sampled "
                "completions (completions.jsonl); remove output.sample_prompts"
            )
        beta, adapter = recipe.objective.beta, recipe.adapter
        if beta != 0 and not adapter.full_weights and not adapter.off_is_start:
            problems.append(
                f"{kind} with beta {beta}: the reference is the adapter switched "
                f"off, and adapter.method {adapter.method!r} (this init) does not start as "
                "the base: set objective.beta: 0 or use lora/dora/ia3 with their default init"
            )
        return problems

    @classmethod
    def packing_refusal(cls, recipe: RecipeView) -> str | None:
        return "objective grpo scores each answer as its own sequence"

    @classmethod
    def data_key(cls, recipe: RecipeView) -> dict[str, Any] | None:
        return {"rows": "prompt", "reference": recipe.objective.reference_column}

    @classmethod
    def prepare_data(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> tuple[PreparedData, list[str] | None]:
        column = recipe.objective.reference_column
        return prepare_prompt_data(recipe.data, tokenizer, seed, column), None

    @classmethod
    def scored_rows(
        cls, recipe: RecipeView, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> PreparedData:
        """The prompts with their reference answers (`PromptRow.scored`)."""
        data, _ = cls.prepare_data(recipe, tokenizer, seed)
        return replace(
            data, train=[r.scored for r in data.train], eval=[r.scored for r in data.eval]
        )

    @classmethod
    def build(cls, ctx: BuildContext) -> Objective:
        """Rewards imported, stop ids and the reference chosen."""
        from peftkit.objectives.grpo_run import GRPORun
        from peftkit.objectives.preference_run import frozen_copy
        from peftkit.objectives.rewards import build_rewards

        spec, model = ctx.recipe.objective, ctx.model
        eos = model.generation_config.eos_token_id  # the run's stop ids (set by the loop)
        stop_ids = sorted(eos if isinstance(eos, list) else {eos} - {None})
        frozen = (
            frozen_copy(model) if spec.beta != 0 and not hasattr(model, "disable_adapter") else None
        )
        return GRPORun(
            spec,
            build_rewards(spec.rewards, None, ctx.tokenizer.chat_template),
            ctx.tokenizer,
            stop_ids,
            ctx.recipe.train.seed,
            ctx.unwrap,
            frozen,
            ctx.recipe.eval.max_new_tokens,
        )

    @classmethod
    def summary_rows(cls, summary: dict[str, Any]) -> list[tuple[str, str]]:
        """Mean reward of the rollouts (first and last step), the held-out reward before -> after."""
        g = summary.get("grpo")
        if not g:
            return []
        rows = []
        if "train_reward_first" in g:
            rows.append(
                (
                    "reward (rollouts)",
                    f"{g['train_reward_first']:.4f} at the first step -> "
                    f"{g['train_reward_last']:.4f} at the last ({', '.join(g['rewards'])}; "
                    f"loss {g['loss_type']})",
                )
            )
        if "eval_reward_before" in g:
            rows.append(
                (
                    "reward (held-out)",
                    f"{g['eval_reward_before']:.4f} -> {g['eval_reward_after']:.4f} "
                    "(greedy answers)",
                )
            )
        return rows


register(GRPO)
