"""How one optimizer step is applied: through accelerate (one process, DDP, FSDP2) or through the
DeepSpeed engine. Chosen once at setup (`for_accelerator`); the loop calls the same four verbs.

The loop's loss for micro-batch i is `loss_i = Σ token losses_i × processes / N` (N: the step's
supervised tokens over every micro-batch and process), so Σ_i ∇loss_i averaged over processes is
the gradient of the mean over all N tokens, whoever applies it. DeepSpeed would divide each
micro-batch's loss by its `gradient_accumulation_steps` again: peftkit passes
`scale_wrt_gas=False` and marks the accumulation boundary itself, as accelerate's own wrapper does.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from peftkit.errors import RecipeError
from peftkit.recipe.schema import TrainSpec
from peftkit.training.optim import gradient_norm


def engine_name(accelerator: Accelerator) -> str:
    """The distributed engine a run trains under: single, DDP, FSDP2, DeepSpeed ZeRO-n."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return f"FSDP{getattr(accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    return "DDP" if accelerator.num_processes > 1 else "single"


def configure_deepspeed(accelerator: Accelerator, train: TrainSpec) -> None:
    """Fill the launch's DeepSpeed config from the recipe before `prepare` (which resolves no
    `auto` value without a dataloader): micro-batch size, accumulation steps, clipping. A value the
    launch config sets explicitly must agree with the recipe (`RecipeError` otherwise)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm or 0.0,  # 0: DeepSpeed does not clip
    }
    wanted["train_batch_size"] = (
        train.micro_batch_size * train.grad_accum * accelerator.num_processes
    )
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            recipe_key = {
                "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                "gradient_accumulation_steps": "train.grad_accum",
                "gradient_clipping": "train.max_grad_norm",
                "train_batch_size": "train.micro_batch_size x train.grad_accum x processes",
            }[key]
            raise RecipeError(
                f"the DeepSpeed config sets {key}: {given}, but the recipe's {recipe_key} means "
                f"{value}: set it to auto in the accelerate config (peftkit fills it from the "
                "recipe), or change the recipe"
            )
        config[key] = value
    # The client optimizer (peftkit's AdamW) is what the engine steps.
    config["zero_allow_untested_optimizer"] = True


class Update:
    """Backward, gradient norm (clipped) and optimizer step through accelerate."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: Any) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: no gradient all-reduce but on the last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def grad_norm(self, max_norm: float | None) -> float:
        """The gradients' total norm before the update; clipped to `max_norm` if set."""
        return gradient_norm(self.accelerator, self.model, max_norm)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedUpdate(Update):
    """The DeepSpeed engine applies the update (ZeRO's partitioned optimizer, its clipping at
    `gradient_clipping` = train.max_grad_norm, the same formula as torch's); peftkit marks the
    accumulation boundary, reads the norm of the reduced gradients *before* `engine.step()` (so the
    non-finite guard stops a step before it is applied), and steps the engine once per step."""

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # ZeRO-2/3 reduce gradients as they are made

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.set_gradient_accumulation_boundary(is_boundary=last)
        self.model.backward(loss, scale_wrt_gas=False)

    def grad_norm(self, max_norm: float | None) -> float:
        """The total norm of the reduced gradients (not yet clipped: DeepSpeed clips in `step`),
        from DeepSpeed's public gradient accessors: ZeRO-3, this process's partition of each
        gradient and one all-reduce; ZeRO-1/2, each whole gradient (one all-reduce per tensor)."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        params = [p for p in self.model.module.parameters() if p.requires_grad]
        if self.model.zero_optimization_stage() == 3:
            local = [safe_get_local_grad(p) for p in params]
            squares = torch.zeros((), dtype=torch.float32, device=self.accelerator.device)
            for g in local:
                if g is not None:
                    squares = squares + g.detach().float().pow(2).sum()
            total = self.accelerator.reduce(squares, "sum")
        else:
            grads = [safe_get_full_grad(p) for p in params]
            norms = [g.detach().float().norm() for g in grads if g is not None]
            total = torch.stack(norms).pow(2).sum() if norms else torch.zeros(())
        return math.sqrt(float(total))

    def step(self) -> None:
        self.model.step()

    def zero_grad(self) -> None:
        """A step abandoned before the update: drop its gradients (ZeRO's buffers included)."""
        self.model.zero_grad()
        self.model.optimizer.zero_grad(set_to_none=True)


def for_accelerator(accelerator: Accelerator, model: nn.Module, optimizer: Any) -> Update:
    """The `Update` for the prepared `model` (a DeepSpeed engine under DeepSpeed)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedUpdate(accelerator, model, optimizer)
    return Update(accelerator, model, optimizer)
