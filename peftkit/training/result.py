"""What a finished run leaves besides its summary: the trained result (adapter or whole model, with
its tokenizer and manifest) and the run directory's files (metadata, samples, answers, plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.data.pipeline import PreparedData
from peftkit.io import RunLayout, atomic_dir, atomic_write_json
from peftkit.methods.base import ApplyContext, MethodSpec
from peftkit.metrics import MetricsLog, plot_losses
from peftkit.models.manifest import BaseIdentity, training_prompt, write_manifest
from peftkit.recipe.schema import Recipe
from peftkit.training.sharded import gathered_trainable


def save_result(
    accelerator: Accelerator,
    model: nn.Module,
    target: Path,
    method: MethodSpec,
    ctx: ApplyContext,
    tokenizer: PreTrainedTokenizerBase,
    base: BaseIdentity,
    data: PreparedData,
    recipe_dump: dict[str, Any],
    system_prompt: str | None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> None:
    """Write the trained result to `target` (atomically, on the main process): the method's own
    format, the tokenizer and the manifest that later loads check (`models.manifest`)."""
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    # Sharded (FSDP): the trainable weights are gathered into the main process, nothing else.
    with gathered_trainable(model, keep=main):
        if main:
            with atomic_dir(target) as tmp:
                method.save(model, tmp, ctx)
                tokenizer.save_pretrained(str(tmp))
                write_manifest(
                    tmp,
                    base,
                    method=method.method,
                    chat_template=data.chat_template.template,
                    stop_tokens=data.stop_tokens,
                    recipe=recipe_dump,
                    quantization=recipe_dump["model"]["quantization"],
                    prompt=training_prompt(
                        data.chat_template.template,
                        data.chat_template.source,
                        system_prompt,
                        data.system_turns,
                        chat_template_kwargs,
                    ),
                )
    accelerator.wait_for_everyone()


def write_run_files(
    recipe: Recipe,
    run: RunLayout,
    metadata: dict[str, Any],
    metrics: MetricsLog,
    samples_before: list[str] | None,
    samples_after: list[str] | None,
    answers: Any,
) -> None:
    """meta.json, samples.json (answers before -> after), answers.json and the loss plot."""
    atomic_write_json(run.meta, metadata)
    if samples_after is not None and samples_before is not None:
        rows = zip(recipe.output.sample_prompts, samples_before, samples_after)
        atomic_write_json(run.samples, [dict(prompt=p, before=b, after=a) for p, b, a in rows])
    if answers is not None:
        atomic_write_json(run.answers, answers)
    if recipe.output.plot:
        title = f"{recipe.name}: {recipe.adapter.method} on {recipe.model.name}"
        plot_losses(metrics, run.plot, title, recipe.objective_kind.charts)
