"""What a run saves of itself: checkpoints (never one with non-finite weights) and the trained
result (the final adapter, `best/`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.pipeline import PreparedData
from peftkit.errors import TrainingStopped
from peftkit.methods.base import ApplyContext
from peftkit.models.manifest import BaseIdentity
from peftkit.recipe.schema import Recipe
from peftkit.training import advice
from peftkit.training import checkpoint as ckpt
from peftkit.training.result import save_result
from peftkit.training.run_dir import RunDir


class Saves:
    """Checkpoints and results of one run; `saved_step` is the step last checkpointed."""

    def __init__(
        self,
        recipe: Recipe,
        recipe_dump: dict[str, Any],
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: Any,
        scheduler: Any,
        state: ckpt.TrainerState,
        run: RunDir,
        ctx: ApplyContext,
        tokenizer: PreTrainedTokenizerBase,
        base_identity: BaseIdentity,
        data: PreparedData,
        phase: Callable[[str], AbstractContextManager[None]],
    ) -> None:
        self.recipe, self.recipe_dump, self.accelerator = recipe, recipe_dump, accelerator
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.run, self.ctx, self.tokenizer = run, ctx, tokenizer
        self.base_identity, self.data, self.phase = base_identity, data, phase
        self.saved_step: int | None = None

    def result(self, target: Path) -> None:
        """The trained result (adapter or whole model, tokenizer, manifest) into `target`."""
        save_result(
            self.accelerator,
            self.accelerator.unwrap_model(self.model),
            target,
            self.recipe.adapter,
            self.ctx,
            self.tokenizer,
            self.base_identity,
            self.data,
            self.recipe_dump,
            self.recipe.data.system_prompt,
            self.recipe.data.chat_template_kwargs,
        )

    def checkpoint(self, rng: dict[str, Any]) -> Path:
        """A checkpoint of the current step, with the RNG state `rng` to resume from."""
        bad = ckpt.non_finite_weights(self.accelerator.unwrap_model(self.model))
        if bad:  # never save (nor later announce) a checkpoint one cannot continue from
            raise TrainingStopped(
                advice.non_finite_weights(bad, self.recipe, self.state.step, self.run)
            )
        self.saved_step = self.state.step
        with self.phase(f"saving checkpoint step-{self.state.step:07d}"):
            return ckpt.save_checkpoint(
                self.run.checkpoints,
                self.accelerator,
                self.model,
                self.optimizer,
                self.scheduler,
                self.state,
                rng,
                self.recipe.train.keep_last,
            )

    def stop_at_boundary(self, signal_name: str | None) -> str:
        """Checkpoint the step just completed (unless saved already); the message to stop with."""
        path = self.run.checkpoints / f"step-{self.state.step:07d}"
        if self.saved_step != self.state.step:
            path = self.checkpoint(ckpt.rng_state())
        return (
            f"interrupted ({signal_name or 'stop signal'}) at step {self.state.step}; checkpoint "
            f"saved to {path}. Continue with --resume."
        )
