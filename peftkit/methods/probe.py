"""Feature extraction (a linear probe): the base model frozen, only a new task head trained.

    logits = W h(x) + b      with h(x) the frozen model's last-token ([CLS] for encoders) state

The cheapest fine-tuning there is, and the baseline every other method should beat: it measures
what the pretrained features already know about the task. Needs `task.type` classification or
regression (a causal LM has no new head to train). The result is the whole model with its head,
saved like a full fine-tune (the base weights are unchanged copies), loadable with
`AutoModelForSequenceClassification.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from peftkit.methods.base import ApplyContext, MethodSpec
from peftkit.methods.full import head_names
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from torch import nn


@register
class LinearProbeSpec(MethodSpec):
    """Feature extraction: freeze the base, train only the task head."""

    method: Literal["linear_probe"] = "linear_probe"
    full_weights: ClassVar[bool] = True
    final_dir_name: ClassVar[str] = "model"
    causal_lm: ClassVar[bool] = False

    def wants_low_precision_base(self) -> bool:
        return True  # the base is frozen: bf16 storage loses nothing that is trained

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        heads = head_names(model)
        if not heads:
            raise ValueError("linear_probe: the model has no classification head to train")
        for name, p in model.named_parameters():
            p.requires_grad_(name in heads)
            if name in heads:
                p.data = p.data.float()  # trained: an fp32 master copy even over a bf16 base
        return model

    def save(self, model: nn.Module, out_dir: Path, ctx: ApplyContext) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
