"""What the memory planner needs to know about a model, read without loading any weight: the
architecture from its config, and parameter counts from a copy built on the meta device with the
recipe's adapter method applied (so the trainable count is peft's own, not a formula)."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftkit.methods.base import ApplyContext
from peftkit.recipe.schema import Recipe


@dataclass(frozen=True)
class ModelCounts:
    base_params: int
    """Parameters of the base model."""
    quantizable_params: int
    """Weights of the decoder's nn.Linear layers: what bitsandbytes quantizes (not embeddings, norms or the head)."""
    trainable_params: int
    adapter_params: int
    """Parameters the method adds (0 for full/partial fine-tuning)."""
    adapter_input_features: int
    """Sum of input widths of the adapted linear layers in one decoder layer (LoRA casts each input)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    fused_mlp: bool = False
    """Every decoder MLP runs as the fused LoRA SwiGLU in training (kernels/lora_mlp.py)."""
    fused_head: bool = False
    """The head and cross-entropy run fused (kernels/linear_ce.py): no logits kept."""
    head_softcap: bool = False
    """The fused head soft-caps its logits (one more fp32 chunk buffer)."""
    kv_width: int = 0
    """KV heads x head dimension (0: kv_heads x hidden / heads)."""
    fused_chunk_rows: int = 256
    """Rows per fused chunk at this vocabulary (`linear_ce.rows_per_chunk`)."""
    moe: MoECounts | None = None
    """The routed experts, for a mixture-of-experts model (None: dense)."""
    frozen_experts: tuple[str, ...] = ()
    """MoE expert parameters nothing trains (`models.layers.frozen_experts`)."""


@dataclass(frozen=True)
class MoECounts:
    """A mixture-of-experts decoder's routed experts (transformers 5's 3-D expert weights)."""

    layers: int
    """Decoder layers with routed experts (DeepSeek-style models keep the first ones dense)."""
    experts: int
    experts_per_token: int
    intermediate: int
    """Width of one expert's MLP."""
    shared_intermediate: int = 0
    """Width of the always-on shared expert MLP (Qwen2-MoE, DeepSeek), 0 if none."""
    adapted_params: int = 0
    """Elements of one MoE layer's expert weights that a LoRA adapts (`target_parameters`):
    peft rebuilds each as W + s·BA on every forward, and autograd keeps that copy."""
    adapter_params: int = 0
    """Elements of one MoE layer's expert LoRA factors: over 16-bit weights peft casts them
    (fp32) to the weights' dtype for the fold, and autograd keeps those copies."""
    kept_widths: int = 4
    """Expert-width tensors each routed row keeps: 4 for SwiGLU experts (gate/up output,
    act(gate), the product), 7 for gpt-oss's clamped GLU (its clamps and sigmoid too)."""


def moe_counts(model: nn.Module, text) -> MoECounts | None:
    """The routed experts of `model` (peft applied) from its 3-D expert weights, or None."""
    from peft.tuners.lora.layer import ParamWrapper

    from peftkit.models.layers import decoder_layers, expert_target

    _, blocks = decoder_layers(model)
    per_layer = []
    for block in blocks:
        experts = {n: p for n, p in block.named_parameters() if p.ndim == 3 and expert_target(n)}
        if experts:
            per_layer.append((block, experts))
    if not per_layer:
        return None
    block, experts = per_layer[0]
    wrappers = [m for m in block.modules() if isinstance(m, ParamWrapper)]
    adapted = sum(m.get_param().numel() for m in wrappers)
    factors = sum(p.numel() for m in wrappers for d in (m.lora_A, m.lora_B) for p in d.parameters())
    width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    shared = (
        getattr(text, "shared_expert_intermediate_size", 0)
        or (getattr(text, "n_shared_experts", 0) or 0) * width
    )
    return MoECounts(
        layers=len(per_layer),
        experts=next(iter(experts.values())).shape[0],
        experts_per_token=text.num_experts_per_tok,
        intermediate=width,
        shared_intermediate=shared,
        adapted_params=adapted,
        adapter_params=factors,
        kept_widths=7 if getattr(text, "model_type", "") == "gpt_oss" else 4,
    )


def count(recipe: Recipe, tokenizer) -> ModelCounts:
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.models.load import model_source

    spec = recipe.model
    config = AutoConfig.from_pretrained(
        model_source(spec), revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    head = model.get_output_embeddings()
    base = sum(p.numel() for p in model.parameters())
    quantizable = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    adapter = recipe.adapter.for_counting()  # no SVD of meta weights, no data
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation chatter from peft/transformers
        model = adapter.apply(model, ApplyContext(tokenizer, "", False, False, Path(work)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    first_layer_inputs = sum(
        m.in_features
        for name, m in model.named_modules()
        if name.endswith("base_layer") and isinstance(m, nn.Linear) and ".layers.0." in name
    )
    from peftkit.kernels.linear_ce import fused_head, logit_map, rows_per_chunk
    from peftkit.kernels.lora_mlp import fused_in_training
    from peftkit.models.layers import frozen_experts
    from peftkit.training.generated import kv_width

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ModelCounts(
        base_params=base,
        quantizable_params=quantizable,
        trainable_params=trainable,
        adapter_params=total - base,
        adapter_input_features=first_layer_inputs,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab=text.vocab_size,
        fused_mlp=fused_in_training(model) == text.num_hidden_layers,
        fused_head=fused_head(model) is not None,
        head_softcap=fused_head(model) is not None and logit_map(model).softcap is not None,
        kv_width=kv_width(text),
        fused_chunk_rows=rows_per_chunk(text.vocab_size),
        moe=moe_counts(model, text),
        frozen_experts=tuple(frozen_experts(model)),
    )
