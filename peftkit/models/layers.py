"""Finding the parts of any causal LM: the transformers model under a peft wrapper, the decoder blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")


TASK_HEADS = ("score", "classifier")
"""Top-level module names transformers gives sequence-classification heads (decoder LMs use
`score`, BERT-style encoders `classifier`): new, randomly initialised weights."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the model's transformer blocks.

    Picks the longest ModuleList whose own name is one of the usual block-list names
    (`model.layers` in Llama/Qwen/Mistral, `transformer.h` in GPT-2, ...).
    """
    from torch import nn  # (the recipe schema imports this module: no torch until a model exists)

    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES
    ]
    if not candidates:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(candidates, key=lambda item: len(item[1]))


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself), looking through DDP's
    wrapper first (which, unlike DeepSpeed's engine, does not pass attributes on to its module)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model
