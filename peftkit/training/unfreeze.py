"""Gradual unfreezing and layer-wise learning-rate decay over layer groups (top to bottom).

    lr of group g      = train.lr x layer_lr_decay^g x schedule(step)     (g = 0: the head)
    groups trainable   = min(G, start_groups + (s // K) * groups_per_stage) after s steps

How it runs:
- The optimizer holds every parameter that will ever train from step 0, one param group per
  (layer group, weight decay or not) with its own base lr, so the warmup/cosine LambdaLR scales
  every group alike.
- Groups not unfrozen yet have `requires_grad` False: no gradient, so AdamW skips them and holds
  no state for them (their moments start when they unfreeze), and they stay bit-identical.
- The trainable set is a pure function of the step (`set_step`), re-applied on resume before the
  checkpoint is loaded, so a resumed run unfreezes exactly where an uninterrupted one does.
- Several processes are refused with unfreezing: DDP (no `find_unused_parameters`) expects a
  gradient for every registered parameter at every step. Layer lr decay alone works anywhere.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.errors import RecipeError
from peftkit.methods.base import MethodSpec
from peftkit.models.layer_groups import LayerGroup, layer_groups


class LayerSchedule:
    """Which layer groups train after a given step, and each group's lr factor.

    `LayerSchedule.off()` is the no-op schedule of every other run: no lr factors, no freezing.
    """

    def __init__(
        self,
        groups: list[LayerGroup],
        decay: float = 1.0,
        every: int | None = None,
        per_stage: int = 1,
        start: int = 1,
    ) -> None:
        self.groups, self.decay, self.every = groups, decay, every
        self.per_stage, self.start = per_stage, start

    @classmethod
    def off(cls) -> LayerSchedule:
        return cls([])

    @classmethod
    def for_run(
        cls, adapter: MethodSpec, model: nn.Module, steps_per_epoch: int, processes: int
    ) -> LayerSchedule:
        """The schedule the adapter section asks for, over the parameters the method made trainable."""
        unfreeze = getattr(adapter, "unfreeze", None)
        decay = getattr(adapter, "layer_lr_decay", 1.0)
        if unfreeze is None and decay == 1.0:
            return cls.off()
        if unfreeze is not None and processes > 1:
            raise RecipeError(
                f"adapter.unfreeze cannot run on {processes} processes: DDP expects the same "
                "trainable parameters at every step. Train on one process, or drop adapter.unfreeze "
                "(adapter.layer_lr_decay alone works with several processes)"
            )
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        groups = layer_groups(model, trainable)
        if unfreeze is None:
            return cls(groups, decay)
        every = unfreeze.every_steps or max(1, round(unfreeze.every_epochs * steps_per_epoch))
        return cls(groups, decay, every, unfreeze.groups_per_stage, unfreeze.start_groups)

    @property
    def enabled(self) -> bool:
        return bool(self.groups)

    def lr_scales(self) -> dict[str, float] | None:
        """Parameter name -> lr factor decay^g, for `build_optimizer` (None when off)."""
        if not self.enabled:
            return None
        return {n: self.decay**g for g, group in enumerate(self.groups) for n in group.names}

    def groups_at(self, step: int) -> int:
        """How many groups (from the top) train in the step after `step` completed steps."""
        if self.every is None:
            return len(self.groups)
        return min(len(self.groups), self.start + (step // self.every) * self.per_stage)

    def set_step(self, step: int) -> list[str]:
        """Set `requires_grad` for the state after `step` steps; returns the groups that this
        step unfroze (empty at step 0, between boundaries, and without unfreezing)."""
        if self.every is None:
            return []
        n = self.groups_at(step)
        for g, group in enumerate(self.groups):
            for p in group.params:
                p.requires_grad_(g < n)
        before = self.groups_at(step - 1) if step > 0 else n
        return [group.label for group in self.groups[before:n]]

    def unfrozen_after(self, g: int, total_steps: int) -> int | None:
        """The step after which group g first trains (0 = from the start; None = not in this run)."""
        if self.every is None or g < self.start:
            return 0
        stages = -(-(g + 1 - self.start) // self.per_stage)  # ceil
        return stages * self.every if stages * self.every < total_steps else None

    def describe(self, total_steps: int) -> str:
        """One printed line: the groups, their lr factors and when they unfreeze."""
        parts = []
        for g, group in enumerate(self.groups):
            at = self.unfrozen_after(g, total_steps)
            when = "" if self.every is None else (f" @{at}" if at is not None else " @never")
            parts.append(f"{group.label} x{self.decay**g:.3g}{when}")
        head = "layer groups (top to bottom, lr factor"
        head += ", unfrozen after step)" if self.every is not None else ")"
        return f"{head}: " + ", ".join(parts)

    def summary(self, total_steps: int) -> dict[str, Any]:
        """What the run summary records (empty when off)."""
        if not self.enabled:
            return {}
        return {
            "layer_lr_decay": self.decay,
            "unfreeze_every_steps": self.every,
            "layer_groups": [
                {
                    "group": g,
                    "label": group.label,
                    "params": sum(p.numel() for p in group.params),
                    "lr_factor": self.decay**g,
                    "unfrozen_after_step": self.unfrozen_after(g, total_steps),
                }
                for g, group in enumerate(self.groups)
            ],
        }
