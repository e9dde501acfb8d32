"""What to tell a user whose run stopped: the cause, the checkpoint to continue from, what to change."""

from __future__ import annotations

from peftkit.data.encode import EncodedRow
from peftkit.io import RunLayout
from peftkit.recipe.schema import Recipe
from peftkit.training import checkpoint as ckpt


def last_checkpoint_note(run: RunLayout) -> str:
    saved, _ = ckpt.newest_intact(run.checkpoints)
    if saved is not None:
        return (
            f"The last good checkpoint is {saved.path}; fix the cause, then continue with --resume."
        )
    return "No checkpoint had been written yet (set train.save_every to keep progress)."


def non_finite_step(
    what: str, recipe: Recipe, step: int, run: RunLayout, micro_batches: list[list[EncodedRow]]
) -> str:
    """`what` (the loss or the gradients) became NaN/inf at step `step + 1`, which was not applied."""
    origins = [row.origin for rows in micro_batches for row in rows][:4]
    return (
        f"{what} at step {step + 1}; that step was not applied. {last_checkpoint_note(run)}\n"
        f"  {_try(recipe)}, and check the rows of that step: {', '.join(origins)}"
    )


def non_finite_weights(names: list[str], recipe: Recipe, step: int, run: RunLayout) -> str:
    return (
        f"the weights after step {step} hold NaN or inf ({', '.join(names)}); no checkpoint was "
        f"saved for it. {last_checkpoint_note(run)}\n  {_try(recipe)}"
    )


def _try(recipe: Recipe) -> str:
    """The settings that tame divergence; each may be changed on --resume."""
    t = recipe.train
    return (
        f"Try: a lower train.lr (now {t.lr}), train.max_grad_norm (now {t.max_grad_norm}), "
        f"a longer warmup (train.warmup_steps), bf16 instead of fp16"
    )


def out_of_memory(recipe: Recipe, step: int, run: RunLayout) -> str:
    t = recipe.train
    return (
        f"out of memory at step {step + 1}. {last_checkpoint_note(run)}\n  Try: "
        f"train.micro_batch_size {max(1, t.micro_batch_size // 2)} with train.grad_accum "
        f"{t.grad_accum * 2} (same global batch), train.micro_batch_tokens (packed runs: a "
        f"token cap per forward pass), train.gradient_checkpointing: true, a shorter "
        f"data.max_length (now {recipe.data.max_length}), or QLoRA (model.quantization.bits: 4)"
    )
