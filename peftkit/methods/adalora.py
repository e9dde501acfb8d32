"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated across layers during training.

    delta W = (alpha / r_eff) P diag(E) Q,    P (out x r), E (r), Q (r x in)

Every layer starts at `init_r`; after `tinit` warm-up steps the total budget shrinks (cubically)
to `target_r` per layer on average by `total - tfinal`, and the triplets (P_i, E_i, Q_i) with the
least importance (an EMA of |w * grad|, times its uncertainty) get E_i masked to zero; the last
`tfinal` steps train the pattern found. Orthogonality of P and Q is kept by a penalty,

    loss += orth_reg_weight * mean over P, Q of || P^T P - I ||_F   (|| Q Q^T - I ||_F for Q),

which peft adds inside `AdaLoraModel.forward` only when the model computes the loss itself
(labels given); peftkit computes its own loss, so the method adds it (`extra_loss`). The budget
step is `update_and_allocate(step)` after each optimizer step (`on_optimizer_step`), with
peft's `total_step` the run's step count (`set_run_length`). The saved adapter holds the ranks kept (peft prunes
the masked triplets on save); it merges into the base like LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from peftkit.errors import RecipeError
from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    import torch
    from peft import AdaLoraConfig
    from torch import nn


@register
class AdaLoraSpec(PeftMethod):
    """AdaLoRA: SVD-form LoRA whose ranks are pruned to a budget during training."""

    method: Literal["adalora"] = "adalora"
    mergeable: ClassVar[bool] = True
    lora_family: ClassVar[bool] = True
    init_r: int = Field(default=12, gt=0)
    """Rank every adapted layer starts with."""
    target_r: int = Field(default=8, gt=0)
    """Average rank per layer at the end of the budget schedule (at most init_r)."""
    alpha: float = Field(default=8, gt=0)
    """Scale numerator: the update is scaled by alpha / (the layer's current rank)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""
    exclude_modules: list[str] | None = None
    tinit: int = Field(default=0, ge=0)
    """Warm-up steps at the full init_r budget before ranks are pruned."""
    tfinal: int = Field(default=0, ge=0)
    """Last steps that train the final rank pattern without reallocating."""
    delta_t: int = Field(default=1, gt=0)
    """Steps between two reallocations during the budget phase (peft's deltaT)."""
    beta1: float = Field(default=0.85, ge=0, lt=1)
    """EMA factor of the importance (sensitivity) scores."""
    beta2: float = Field(default=0.85, ge=0, lt=1)
    """EMA factor of the importance scores' uncertainty."""
    orth_reg_weight: float = Field(default=0.5, ge=0)
    """Weight of the orthogonality penalty on P and Q added to the loss."""

    @model_validator(mode="after")
    def _target_within_init(self) -> AdaLoraSpec:
        if self.target_r > self.init_r:
            raise ValueError(
                f"adapter.target_r ({self.target_r}) exceeds adapter.init_r ({self.init_r}): "
                "AdaLoRA only prunes ranks; lower target_r or raise init_r"
            )
        return self

    def sharded_problems(self, engine: str) -> list[str]:
        return [
            f"adapter.method adalora under {engine}: its rank allocator reads every adapter "
            "weight's whole gradient after the update, which a sharding engine does not keep: "
            "launch it with DDP or on one process"
        ]

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> AdaLoraConfig:
        from peft import AdaLoraConfig

        return AdaLoraConfig(
            task_type=ctx.task_type,
            init_r=self.init_r,
            target_r=self.target_r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.delta_t,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            # the shortest schedule peft accepts; `set_run_length` gives it the run's own length
            total_step=self.tinit + self.tfinal + 1,
        )

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        if ctx.resuming:
            raise RecipeError(
                "adapter.method adalora cannot --resume: its rank allocator's importance "
                "averages are not part of a checkpoint, so a resumed run would prune other "
                "ranks than an uninterrupted one; start the run again"
            )
        return super().apply(model, ctx)

    def set_run_length(self, model: nn.Module, total_steps: int) -> None:
        """peft's `total_step` is the run's step count (train.max_steps, or the epochs over the
        data), so it is never typed twice."""
        if self.tinit + self.tfinal >= total_steps:
            raise RecipeError(
                f"adapter.tinit ({self.tinit}) + adapter.tfinal ({self.tfinal}) leave no "
                f"budget phase in a run of {total_steps} steps: lower them or train longer"
            )
        model.base_model.rankallocator.set_total_step(total_steps)  # (the config's, too)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """peft's orthogonality penalty (`AdaLoraModel.forward`), for the trainable adapter."""
        import torch

        tuner = model.base_model
        name = tuner.trainable_adapter_name
        weight = tuner.peft_config[name].orth_reg_weight
        if weight == 0:
            return None
        terms = []
        for n, p in tuner.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and name in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p  # (r, r)
                eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        if not terms:
            return None
        return weight * (sum(terms) / len(terms))

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Update the importance scores from this step's gradients and mask to the budget."""
        model.base_model.update_and_allocate(step)
