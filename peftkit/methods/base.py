"""What every adapter method provides: validation against the recipe, application to a model, saving."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import model_validator

from peftkit.models.spec import ModelSpec
from peftkit.section import Section

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase


class _TrainValues(Protocol):
    @property
    def packing(self) -> bool | None: ...
    @property
    def precision(self) -> str: ...
    @property
    def gradient_checkpointing(self) -> bool: ...


class RecipeView(Protocol):
    """What a method's `check_recipe` reads of the recipe that composes it: the model section and
    a few train values. The recipe (`peftkit.recipe.schema.Recipe`, a layer up) passes
    itself; methods never import it."""

    @property
    def model(self) -> ModelSpec: ...
    @property
    def train(self) -> _TrainValues: ...


@dataclass
class ApplyContext:
    """What a method needs besides the model to attach itself."""

    tokenizer: PreTrainedTokenizerBase
    tokenizer_path: str
    gradient_checkpointing: bool
    quantized: bool
    work_dir: Path
    """Folder in the run directory where a method may keep files it needs again on resume."""
    upcast_unquantized: bool = False
    """A quantized base's unquantized layers go to fp32 (`QuantizationSpec.upcast_unquantized`)."""
    task_type: str = "CAUSAL_LM"
    """peft's task type: CAUSAL_LM, or SEQ_CLS for a classification/regression head (peft then
    trains and saves the head in full, with the adapter)."""
    resuming: bool = False
    """The run continues from a checkpoint (`--resume`)."""
    batches: Callable[[int], list[dict[str, torch.Tensor]]] | None = None
    """`batches(n)`: the first n micro-batches of the run's training rows, in training order,
    collated (input_ids, attention_mask, labels) on the CPU; for initialisations that
    read activations (EVA, CorDA). None where the run's rows are not token rows."""


class MethodSpec(Section):
    """Base of every adapter method's recipe section."""

    method: str

    # What the method can do, declared once here and in each method's class, where it registers.
    # Consumers (training, planner, export, the recipe's cross-field rules) ask these; none keeps
    # its own list of method names.
    full_weights: ClassVar[bool] = False
    """True when the method trains the base weights themselves (its output is a whole model)."""
    final_dir_name: ClassVar[str] = "adapter"
    """The run's result folder (RUN/adapter, RUN/model)."""
    virtual_tokens: ClassVar[bool] = False
    """True when the method prepends virtual tokens or a KV prefix: then rows cannot be packed and
    logits cannot be picked by position."""
    layerwise: ClassVar[bool] = False
    """True when the method accepts `unfreeze` and `layer_lr_decay` (it trains whole layers)."""
    mergeable: ClassVar[bool] = False
    """True when the trained adapter can be merged into the base weights (export to one model).
    Whole-model methods have nothing to merge: their result already is the model."""
    gguf_adapter: ClassVar[bool] = False
    """True when the adapter has a llama.cpp GGUF adapter form (`--format gguf --adapter-only`)."""
    lora_family: ClassVar[bool] = False
    """True for low-rank updates (LoRA, QLoRA): the planner counts their extra activations (the
    fp32 input each adapter keeps under mixed precision)."""
    causal_lm: ClassVar[bool] = True
    """True when the method can train a causal LM; False when it only trains a new task head."""
    task_heads: ClassVar[bool] = True
    """True when the method can train a classification/regression head (peft task type SEQ_CLS)."""
    quantized_variant: ClassVar[str | None] = None
    """The method that does the same over a 4-bit base (lora -> qlora): the planner offers it when
    the recipe does not fit."""

    @model_validator(mode="before")
    @classmethod
    def _layerwise_options_need_layerwise_method(cls, value: Any) -> Any:
        # A clearer message than "unknown key" for options that exist on other methods.
        if isinstance(value, dict) and not cls.layerwise:
            for key in ("unfreeze", "layer_lr_decay"):
                if key in value:
                    raise ValueError(
                        f"adapter.{key} applies to whole-model methods only (full, partial), "
                        f"not {value.get('method')!r}: remove adapter.{key} or use method: full"
                    )
        return value

    @property
    def off_is_start(self) -> bool:
        """True when the fresh adapter leaves the model's function unchanged (LoRA's B = 0, IA3's
        ones), so the base with the adapter switched off *is* the model training starts from (the
        preference objectives' reference). Not so for virtual tokens or PiSSA/OLoRA."""
        return not self.virtual_tokens

    def check_recipe(self, recipe: RecipeView) -> list[str]:
        """Cross-field problems of this method with the rest of the recipe, as messages."""
        problems = []
        if self.full_weights and recipe.model.quantization is not None:
            problems.append(
                f"adapter.method {self.method!r} trains the base weights, which cannot be quantized: "
                "remove model.quantization or use method: qlora"
            )
        if self.virtual_tokens and recipe.train.packing:
            problems.append(
                f"adapter.method {self.method!r} prepends virtual tokens, so rows cannot be packed: "
                "set train.packing: false (or leave it unset)"
            )
        return problems

    def wants_low_precision_base(self) -> bool:
        """Whether frozen base weights may be stored in bf16/fp16 under that training precision."""
        return not self.full_weights

    def lr_scales(self, model: nn.Module, lr: float) -> dict[str, float] | None:
        """Trainable parameter name -> learning-rate factor, for methods that train some parameters
        faster than others (LoRA+); None when every parameter trains at `train.lr`."""
        return None

    def sharded_problems(self, engine: str) -> list[str]:
        """What this method cannot do when `engine` (FSDP, DeepSpeed) splits the weights or
        gradients over processes, as messages (checked before anything loads)."""
        return []

    def export_refusal(self, adapter_only: bool) -> str | None:
        """Why this trained adapter cannot be exported (merged, or adapter-only when
        `adapter_only`), beyond what the class's capabilities say; None when it can."""
        return None

    def for_counting(self) -> MethodSpec:
        """A spec with the same trainable parameters whose `apply` runs on a meta-device model
        without data (the planner counts parameters so): initialisations that read weights or
        data give way to the default one."""
        return self

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        """Attach the method to a loaded base model and return the model to train."""
        raise NotImplementedError

    # Hooks the training loop calls for every method (most do nothing).
    def set_run_length(self, model: nn.Module, total_steps: int) -> None:
        """Called once at setup, when the run's step count is known (after `apply`, before the
        optimizer is built); raises `RecipeError` for a schedule that cannot fit in it."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added once per optimizer step to the loss being minimised (a regulariser on
        the adapter's own weights, e.g. AdaLoRA's orthogonality penalty); `model` is unwrapped."""
        return None

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer applied step `step` (0-based) and before the gradients are
        cleared (AdaLoRA reallocates its ranks from them); `model` is unwrapped."""

    def save(self, model: nn.Module, out_dir: Path, ctx: ApplyContext) -> None:
        """Write the trained result (adapter or weights) in its standard format to `out_dir`."""
        raise NotImplementedError
