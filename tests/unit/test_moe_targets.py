"""MoE experts: transformers 5 stores routed experts as 3-D parameters, which `all-linear` misses;
`expert_parameters` finds them for each MoE layout, and LoRA on them merges exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from peftkit.models.layers import expert_parameters, frozen_experts

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def tiny_moe(kind: str):
    import transformers as t

    torch.manual_seed(0)
    if kind == "qwen3_moe":
        config = t.Qwen3MoeConfig(
            **TINY, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
        return t.Qwen3MoeForCausalLM(config)
    if kind == "mixtral":
        config = t.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
        return t.MixtralForCausalLM(config)
    if kind == "olmoe":
        config = t.OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2)
        return t.OlmoeForCausalLM(config)
    if kind == "gpt_oss":
        config = t.GptOssConfig(**TINY, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
        return t.GptOssForCausalLM(config)
    config = t.DeepseekV3Config(  # DeepSeek-style: MLA attention, shared + routed experts
        **{**TINY, "num_key_value_heads": 2},
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    return t.DeepseekV3ForCausalLM(config)


LAYOUTS = ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_experts_are_found_and_lora_on_them_merges_exactly(kind):
    from peft import LoraConfig, get_peft_model

    model = tiny_moe(kind).eval()
    targets = expert_parameters(model)
    assert targets == ["experts.down_proj", "experts.gate_up_proj"]
    model.requires_grad_(False)
    assert frozen_experts(model) == targets
    attention = ["q_proj", "v_proj"] if kind != "deepseek_v3" else ["q_b_proj", "kv_b_proj"]
    plain = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=attention))
    assert frozen_experts(plain) == targets  # named linears never reach the 3-D experts

    config = LoraConfig(r=4, lora_alpha=8, target_modules=attention, target_parameters=targets)
    adapted = get_peft_model(copy.deepcopy(model), config)
    assert frozen_experts(adapted) == []
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        want = adapted(ids).logits
        merged = copy.deepcopy(adapted).merge_and_unload()
        got = merged(ids).logits
        assert (want - model(ids).logits).norm() / want.norm() > 1e-3
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert set(merged.state_dict()) == set(model.state_dict())  # plain weights again
