"""The recipe's `objective:` section: what the loss optimises. A union keyed on `type`.

    objective: sft                      # next-token cross-entropy on the supervised tokens (default)
    objective: {type: dpo, beta: 0.1}   # preference tuning on {prompt, chosen, rejected} rows

The preference losses and their knobs follow TRL's names and defaults (`DPOConfig`, `ORPOConfig`,
`KTOConfig`, `CPOConfig` with `loss_type: simpo`), so a TRL recipe translates key for key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from peftkit.section import Section


class SFTObjective(Section):
    """Supervised fine-tuning: cross-entropy on the supervised tokens (or a task head's loss)."""

    type: Literal["sft"] = "sft"

    @property
    def preference(self) -> bool:
        return False

    @property
    def needs_reference(self) -> bool:
        return False


class _PreferenceObjective(Section):
    beta: float = Field(default=0.1, gt=0)
    """Strength of the preference term (DPO/KTO: the KL penalty's inverse temperature)."""

    @property
    def preference(self) -> bool:
        return True

    @property
    def needs_reference(self) -> bool:
        return False


class DPOObjective(_PreferenceObjective):
    """Direct Preference Optimization (Rafailov et al. 2023) on {prompt, chosen, rejected} pairs.

    With log-ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x) (summed over answer tokens) and rho_l:
        sigmoid: -log sigmoid(beta (rho_w - rho_l))
        ipo:     ((rho_w / |y_w| - rho_l / |y_l|) - 1 / (2 beta))^2   (TRL's length-normalised IPO)
        hinge:   max(0, 1 - beta (rho_w - rho_l))
    The reference pi_ref is the base: the adapter switched off (no second copy), a frozen copy of
    the starting weights for full/partial fine-tuning, or log-probs computed once before training.
    """

    type: Literal["dpo"]
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    precompute_ref: bool = False
    """Score every row with the reference once before training and keep the log-probs in the run
    directory (resume reuses them): no reference forward per step, no frozen copy in memory."""

    @property
    def needs_reference(self) -> bool:
        return True


class KTOObjective(_PreferenceObjective):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on {prompt, completion, label} rows
    (pairs are split into a desirable and an undesirable row). With z = KL estimate of the batch
    (mismatched prompt/completion pairs, as TRL builds it):
        desirable:   w_d (1 - sigmoid(beta (rho - z)))
        undesirable: w_u (1 - sigmoid(beta (z - rho)))
    """

    type: Literal["kto"]
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)

    @property
    def needs_reference(self) -> bool:
        return True


class ORPOObjective(_PreferenceObjective):
    """Odds Ratio Preference Optimization (Hong et al. 2024): no reference model. With mean
    log-probs per answer token l_w, l_l and log odds(y) = l - log(1 - exp(l)):
        loss = NLL(chosen) - beta * log sigmoid(log odds(y_w) - log odds(y_l))
    (`beta` is the paper's lambda, as in TRL)."""

    type: Literal["orpo"]


class SimPOObjective(_PreferenceObjective):
    """Simple Preference Optimization (Meng et al. 2024): no reference model; length-normalised
    log-probs l_w, l_l and a target margin gamma:
        loss = -log sigmoid(beta (l_w - l_l) - gamma) + sft_weight * NLL(chosen)
    (TRL's CPO trainer with loss_type simpo; `simpo_gamma` and `cpo_alpha` there)."""

    type: Literal["simpo"]
    beta: float = Field(default=2.0, gt=0)
    gamma: float = Field(default=0.5, ge=0)
    """The target reward margin (TRL: simpo_gamma)."""
    sft_weight: float = Field(default=0.0, ge=0)
    """Weight of the chosen answers' NLL added to the loss (TRL: cpo_alpha; 0 = pure SimPO)."""


class RewardSpec(Section):
    """One reward of a reinforcement-learning objective: a Python function or a task metric,
    weighted. A function has TRL's reward signature, `fn(prompts, completions, completion_ids,
    **columns) -> list[float | None]`, each column of the data row passed as a list, so reward
    functions written for TRL's GRPOTrainer work unchanged; None = this function does not score
    that completion."""

    function: str | None = None
    """`module:function` or `path/to/file.py:function` (relative to the recipe's folder first)."""
    metric: Literal["exact", "contains", "json_fields"] | None = None
    """A task metric as the reward, scored against the row's `reference` column."""
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
    (peftkit/training/grpo_losses.py has the formulas)."""

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
    def preference(self) -> bool:
        return False

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    @property
    def reference_column(self) -> str:
        """The column holding each row's reference answer (what a metric reward and the eval
        metric compare with)."""
        return next((r.reference for r in self.rewards if r.metric is not None), "answer")


ObjectiveSpec = Annotated[
    SFTObjective | DPOObjective | KTOObjective | ORPOObjective | SimPOObjective | GRPOObjective,
    Field(discriminator="type"),
]
OBJECTIVE_TYPES = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")


def objective_from_shorthand(value: Any) -> Any:
    """`objective: dpo` means `objective: {type: dpo}`."""
    return {"type": value} if isinstance(value, str) else value
