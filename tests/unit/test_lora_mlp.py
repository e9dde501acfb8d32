"""The fused LoRA SwiGLU MLP: same outputs and gradients as module-by-module autograd, fewer
saved activations, and the model's own forward wherever the call is not the plain LoRA case."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.training import lora_mlp
from peftkit.training.lora_mlp import install_fused_lora_mlps

INTER = 80


def _pair(mlp_bias: bool = False, **lora):
    """(stock, fused) copies of a tiny peft-wrapped Llama whose LoRA B are non-zero."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=mlp_bias,
    )
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(**{**settings, **lora}))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    fused = copy.deepcopy(model)
    assert install_fused_lora_mlps(fused) == 2
    return model, fused


@pytest.fixture
def calls(lora_swiglu_calls):
    return lora_swiglu_calls


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_same_loss_and_gradients_as_module_by_module(calls, mlp_bias):
    stock, fused = _pair(mlp_bias=mlp_bias, rank_pattern={"down_proj": 2})  # ranks may differ
    ids = torch.randint(0, 100, (3, 9))
    loss_a, grads_a = _loss_and_grads(stock, ids)
    assert calls[0] == 0
    loss_b, grads_b = _loss_and_grads(fused, ids)
    assert calls[0] == 2  # one per layer: the fused path ran
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert any("mlp.down_proj.lora_A" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainable_base_bias_gets_its_gradient(calls):
    stock, fused = _pair(mlp_bias=True, bias="all")  # LoRA bias='all' trains the base biases
    ids = torch.randint(0, 100, (2, 7))
    _, grads_a = _loss_and_grads(stock, ids)
    _, grads_b = _loss_and_grads(fused, ids)
    assert calls[0] == 0  # a trainable base layer is not the plain case: own forward
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_saves_two_fewer_intermediate_tensors_per_token_and_layer():
    stock, fused = _pair()
    ids = torch.randint(0, 100, (2, 16))

    def saved_bytes(model):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    saved = saved_bytes(stock) - saved_bytes(fused)
    # silu(g) and h: two (tokens x intermediate) fp32 tensors per layer, less the small LoRA parts
    assert saved >= 0.9 * 2 * 2 * ids.numel() * INTER * 4


@pytest.mark.parametrize(
    "case", ["dropout", "disabled", "dora", "merged", "autocast", "other-dtype", "two-adapters"]
)
def test_any_other_call_runs_the_models_own_forward(calls, case):
    stock, fused = _pair(lora_dropout=0.1 if case == "dropout" else 0.0, use_dora=case == "dora")
    ids = torch.randint(0, 100, (2, 7))
    models = (stock, fused)
    if case == "two-adapters":
        for model in models:
            model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear"))
            model.base_model.set_adapter(["default", "other"])
    if case == "merged":
        for model in models:
            model.merge_adapter()
    if case == "other-dtype":
        for model in models:
            for name, module in model.named_modules():
                if name.endswith(("mlp.up_proj.lora_A", "mlp.up_proj.lora_B")):
                    module.to(torch.float64)  # peft computes that product in float64
    outputs = []
    for model in models:
        torch.manual_seed(1)  # same dropout masks
        if case == "disabled":
            with model.disable_adapter():
                outputs.append(model(input_ids=ids).logits)
        elif case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append(model(input_ids=ids).logits)
        else:
            outputs.append(model(input_ids=ids).logits)
    assert calls[0] == 0
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_eval_mode_dropout_is_the_plain_case(calls):
    stock, fused = _pair(lora_dropout=0.1)
    stock.eval(), fused.eval()
    ids = torch.randint(0, 100, (2, 7))
    expected = stock(input_ids=ids).logits
    got = fused(input_ids=ids).logits
    assert calls[0] == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_installs_once_on_swiglu_mlps_only():
    _, fused = _pair()
    assert install_fused_lora_mlps(fused) == 0  # already installed
    assert not lora_mlp.is_swiglu_mlp(fused.base_model.model.model.layers[0].self_attn)
