"""Full fine-tuning (every weight) and partial fine-tuning (the top N blocks and/or named parameters).

Both update the base weights themselves, so their result is a whole model saved with
`save_pretrained` (safetensors), loadable with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from peftkit.methods.base import ApplyContext, MethodSpec, RecipeView
from peftkit.methods.registry import register
from peftkit.models.layers import TASK_HEADS, decoder_layers
from peftkit.section import Section

if TYPE_CHECKING:
    from torch import nn


class UnfreezeSpec(Section):
    """Gradual unfreezing (ULMFiT): train the top layer groups first, then add the next group(s)
    down every K steps or epochs. Groups, top to bottom: head, last block, ..., first block,
    embeddings (`peftkit/models/layer_groups.py`). Trainable after step s:
    `min(groups, start_groups + (s // K) * groups_per_stage)`, a pure function of the step, so a
    resumed run unfreezes exactly where an uninterrupted one does."""

    every_steps: int | None = Field(default=None, gt=0)
    """Unfreeze the next group(s) after every K optimizer steps."""
    every_epochs: float | None = Field(default=None, gt=0)
    """Or after every E epochs (round(E x steps per epoch) optimizer steps, at least 1)."""
    groups_per_stage: int = Field(default=1, ge=1)
    """Groups unfrozen at each stage boundary."""
    start_groups: int = Field(default=1, ge=1)
    """Groups trainable from step 0 (1 = the head only)."""

    @model_validator(mode="after")
    def _one_period(self) -> UnfreezeSpec:
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError(
                "adapter.unfreeze needs exactly one of every_steps and every_epochs "
                f"(got every_steps={self.every_steps}, every_epochs={self.every_epochs})"
            )
        return self


class _WholeModelMethod(MethodSpec):
    full_weights: ClassVar[bool] = True
    final_dir_name: ClassVar[str] = "model"
    layerwise: ClassVar[bool] = True

    unfreeze: UnfreezeSpec | None = None
    """Gradual unfreezing, top to bottom (null = every selected weight trains from step 0).
    With several processes it is refused (DDP expects the same trainable set every step)."""
    layer_lr_decay: float = Field(default=1.0, gt=0, le=1)
    """Discriminative / layer-wise lr decay: layer group g (0 = head) trains at lr x decay^g.
    1.0 = off. Typical: 0.8-0.95 (ELECTRA/BEiT fine-tuning)."""

    def check_recipe(self, recipe: RecipeView) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.model.dtype == "float16" and recipe.train.precision != "fp32":
            problems.append(
                "training fp16 weights directly loses small updates to rounding: set model.dtype "
                "float32 (mixed precision still runs the matmuls in half precision) or bfloat16"
            )
        return problems

    def save(self, model: nn.Module, out_dir: Path, ctx: ApplyContext) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)


@register
class FullSpec(_WholeModelMethod):
    """Full fine-tuning: every parameter is trained."""

    method: Literal["full"] = "full"

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if ctx.gradient_checkpointing:
            _gradient_checkpointing(model)
        return model


@register
class PartialSpec(_WholeModelMethod):
    """Partial fine-tuning: freeze everything except the top N decoder blocks and/or named parameters."""

    method: Literal["partial"] = "partial"
    top_layers: int | None = Field(default=2, ge=0)
    """Unfreeze the last N decoder blocks (0 or null: none)."""
    patterns: list[str] = []
    """Regular expressions on parameter names to unfreeze as well, e.g. `lm_head`, `model\\.norm`."""

    @model_validator(mode="after")
    def _something_to_train(self) -> PartialSpec:
        if not self.top_layers and not self.patterns:
            raise ValueError("partial fine-tuning needs top_layers > 0 or at least one pattern")
        return self

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        names = trainable_names(model, self.top_layers or 0, self.patterns)
        names |= head_names(model)  # a new task head is never left at its random init
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        if ctx.gradient_checkpointing:
            _gradient_checkpointing(model)
        return model


def _gradient_checkpointing(model: nn.Module) -> None:
    from peftkit.models.load import enable_gradient_checkpointing  # torch: only when applied

    enable_gradient_checkpointing(model)


def head_names(model: nn.Module) -> set[str]:
    """Parameters of a sequence-classification head (empty for a causal LM)."""
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in TASK_HEADS}


def trainable_names(model: nn.Module, top_layers: int, patterns: list[str]) -> set[str]:
    """Names of the parameters partial fine-tuning trains: top blocks plus pattern matches."""
    selected: set[str] = set()
    if top_layers:
        prefix, layers = decoder_layers(model)
        if top_layers > len(layers):
            raise ValueError(
                f"adapter.top_layers is {top_layers} but the model has {len(layers)} layers"
            )
        wanted = {f"{prefix}.{i}." for i in range(len(layers) - top_layers, len(layers))}
        selected |= {n for n, _ in model.named_parameters() if any(n.startswith(w) for w in wanted)}
    for pattern in patterns:
        rx = re.compile(pattern)
        matched = {n for n, _ in model.named_parameters() if rx.search(n)}
        if not matched:
            raise ValueError(f"adapter.patterns: {pattern!r} matches no parameter name")
        selected |= matched
    return selected
