"""The planner's mixture-of-experts term: what one MoE layer keeps for backward, with and without
a LoRA on its 3-D expert weights, equals (within 5%) the bytes autograd really saves in a
forward of that layer, for each MoE layout transformers 5 stores as 3-D experts, in fp32 and in bf16."""

from __future__ import annotations

import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftkit.models.layers import expert_parameters
from peftkit.planner.counts import moe_counts
from peftkit.planner.estimate import moe_layer_bytes
from tests.unit.test_moe_targets import LAYOUTS, tiny_moe

TOKENS = 64


def _saved_bytes(module, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd still keeps for backward after one forward of
    `module` (what a dead branch saved is freed by then), less the module's own parameters (in
    memory anyway, counted as weights)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: list[weakref.ref] = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    x = torch.randn(1, TOKENS, hidden, requires_grad=True, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapt_experts", [True, False])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_moe_layer_bytes_match_what_autograd_keeps(kind, adapt_experts, dtype):
    model = tiny_moe(kind).to(dtype)
    targets = expert_parameters(model) if adapt_experts else None
    attention = ["q_b_proj"] if kind == "deepseek_v3" else ["q_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=attention, target_parameters=targets)
    )
    counts = moe_counts(peft_model, model.config)
    assert counts is not None and counts.experts == 4 and counts.experts_per_token == 2
    assert counts.layers == (1 if kind == "deepseek_v3" else 2)  # its first layer is dense
    expert_weights = sum(
        p.numel() for n, p in model.model.layers[-1].named_parameters() if p.ndim == 3
    )
    assert counts.adapted_params == (expert_weights if adapt_experts else 0)
    hidden = model.config.hidden_size
    got = _saved_bytes(model.model.layers[-1].mlp, hidden, dtype)
    size = dtype.itemsize  # weights and compute in one dtype (no autocast)
    want = moe_layer_bytes(counts, hidden, TOKENS, size, size)
    assert abs(want - got) / got < 0.05, (got, want)


def test_a_dense_model_has_no_moe_counts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    assert moe_counts(model, model.config) is None
