"""MoE experts through export: a LoRA on the 3-D expert weights (`target_parameters`) merges, on
the streamed path, into the tensors peft's `merge_and_unload` gives where the checkpoint stores
the experts as transformers does (gpt-oss); where it stores them one by one (Qwen3-MoE, Mixtral,
OLMoE, DeepSeek-V3 checkpoints) the streamed path refuses with its reason, and export merges in
memory. GGUF and vLLM refuse MoE models with a named reason before anything is loaded."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peftkit.export.stream import CannotStream, MergedWeights
from peftkit.models.layers import expert_parameters
from tests.unit.test_moe_targets import LAYOUTS, tiny_moe

ATTENTION = {"deepseek_v3": ["q_b_proj", "kv_b_proj"]}
PER_EXPERT_CHECKPOINTS = [k for k in LAYOUTS if k != "gpt_oss"]


def _saved_adapter(kind: str, tmp_path):
    model = tiny_moe(kind)
    model.save_pretrained(str(tmp_path / "base"))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ATTENTION.get(kind, ["q_proj", "v_proj"]),
        target_parameters=expert_parameters(model),
        init_lora_weights=False,  # random B, as after training
    )
    torch.manual_seed(1)
    get_peft_model(model, config).save_pretrained(str(tmp_path / "adapter"))


def test_streamed_expert_merge_equals_merge_and_unload(tmp_path):
    _saved_adapter("gpt_oss", tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    want = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    want = want.merge_and_unload(safe_merge=True).state_dict()
    streamed = MergedWeights(tmp_path / "base", tmp_path / "adapter")
    assert set(streamed) == set(want)
    experts = [k for k in streamed if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 2 * 2  # both expert weights of both layers
    for key in streamed:
        got = streamed[key]
        assert got.shape == want[key].shape, key
        assert (got - want[key]).abs().max().item() <= 1e-5, key
    for key in experts:  # the adapter really moved them
        assert (streamed[key] - before[key]).abs().max() > 1e-3, key


@pytest.mark.parametrize("kind", PER_EXPERT_CHECKPOINTS)
def test_per_expert_checkpoints_are_refused_by_the_streamed_merge(kind, tmp_path):
    _saved_adapter(kind, tmp_path)
    with pytest.raises(CannotStream, match="stores the MoE experts one by one"):
        MergedWeights(tmp_path / "base", tmp_path / "adapter")


@pytest.mark.parametrize("kind", LAYOUTS)
def test_gguf_refuses_each_moe_layout_by_name_from_its_config(kind):
    from peftkit.errors import UnsupportedGGUFExport
    from peftkit.export.gguf_arch import MOE_ARCHITECTURES, check_config

    config = tiny_moe(kind).config
    with pytest.raises(UnsupportedGGUFExport, match="mixture-of-experts") as refused:
        check_config(config)
    assert f"{kind} would be llama.cpp's {MOE_ARCHITECTURES[kind]!r}" in str(refused.value)


def test_vllm_check_refuses_lora_on_expert_parameters(tmp_path):
    from peftkit.export.vllm import check_vllm
    from tests.conftest import CHATML, build_tokenizer

    _saved_adapter("qwen3_moe", tmp_path)
    tokenizer = build_tokenizer(tmp_path / "tok", CHATML)
    check = check_vllm(tmp_path / "adapter", len(tokenizer), tokenizer)
    assert len(check.problems) == 1
    assert "experts.down_proj, experts.gate_up_proj" in check.problems[0]
    assert "export merged weights" in check.problems[0]
