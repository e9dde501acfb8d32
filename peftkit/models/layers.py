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


def expert_target(name: str) -> tuple[str, str] | None:
    """(`experts.gate_up_proj`, the experts module's prefix) for a 3-D expert weight's name, also
    under peft's wrappers (`experts.base_layer.base_layer.gate_up_proj`); else None."""
    parts = name.split(".")
    plain = [x for x in parts if x != "base_layer"]
    if len(plain) < 2 or "experts" not in plain[-2]:
        return None
    at = max(i for i, x in enumerate(parts) if "experts" in x)
    return ".".join(plain[-2:]), ".".join(parts[: at + 1]) + "."


def expert_parameters(model: nn.Module) -> list[str]:
    """The routed experts' weights that transformers 5 stores as 3-D parameters, `(experts, out,
    in)` (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss: `mlp.experts.gate_up_proj`,
    `mlp.experts.down_proj`), as peft's `target_parameters` names them (`experts.gate_up_proj`).
    A list of `target_modules` never reaches them: they are parameters, not `nn.Linear` modules."""
    found = set()
    for name, p in model.named_parameters():
        target = expert_target(name) if p.ndim == 3 else None
        if target is not None:
            found.add(target[0])
    return sorted(found)


def frozen_experts(model: nn.Module) -> list[str]:
    """Expert parameters (as `expert_parameters` names them) that nothing trains: neither the
    weight itself nor an adapter on its experts module."""
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen, adapted = set(), set()
    for name, p in model.named_parameters():
        target = expert_target(name) if p.ndim == 3 else None
        if target is None:
            continue
        name_, prefix = target
        if p.requires_grad or any(t.startswith(prefix) and "lora_" in t for t in trained):
            adapted.add(name_)
        else:
            frozen.add(name_)
    return sorted(frozen - adapted)
