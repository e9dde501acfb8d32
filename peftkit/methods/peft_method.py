"""Shared plumbing of the methods that peft implements: wrap with get_peft_model, save in PEFT format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftkit.methods.base import ApplyContext, MethodSpec

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn


class PeftMethod(MethodSpec):
    """A method expressed as a peft config; the saved result loads with `PeftModel.from_pretrained`."""

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        from peft import get_peft_model, prepare_model_for_kbit_training

        from peftkit.models.load import enable_gradient_checkpointing

        if ctx.quantized and ctx.upcast_unquantized:
            # peft's QLoRA preparation: freezes the base, casts embeddings/norms/head to fp32.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=ctx.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        else:
            if ctx.quantized:  # the same, the unquantized layers left in the compute dtype
                model.requires_grad_(False)
            if ctx.gradient_checkpointing:
                enable_gradient_checkpointing(model)
        return get_peft_model(model, self.peft_config(model, ctx))

    def save(self, model: nn.Module, out_dir: Path, ctx: ApplyContext) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
