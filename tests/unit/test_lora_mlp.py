"""The fused LoRA SwiGLU MLP: same outputs and gradients as module-by-module autograd (fp32, bf16
autocast over a bf16 base with fp32 LoRA weights, LoRA dropout, 4-bit NF4 bases), fewer saved
activations, and the model's own forward wherever the call is not the plain LoRA case."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit._compat import keep_bnb_4bit_cpu_weights_unpacked
from peftkit.kernels import lora_mlp
from peftkit.kernels.lora_mlp import install_fused_lora_mlps

INTER = 80


def _pair(mlp_bias: bool = False, base_dtype: torch.dtype = torch.float32, **lora):
    """(stock, fused) copies of a tiny peft-wrapped Llama whose LoRA B are non-zero. With a half
    `base_dtype`, peft keeps the LoRA weights in fp32 (its `autocast_adapter_dtype`)."""
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
    base = LlamaForCausalLM(cfg).to(base_dtype)
    model = get_peft_model(base, LoraConfig(**{**settings, **lora}))
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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("half", [False, True])
def test_saves_two_fewer_intermediate_tensors_per_token_and_layer(dropout, half):
    """Also with LoRA dropout (its masks are drawn again in the backward, not kept) and under
    bf16 autocast over a bf16 base."""
    stock, fused = _pair(lora_dropout=dropout, base_dtype=torch.bfloat16 if half else torch.float32)
    ids = torch.randint(0, 100, (2, 16))

    def saved_bytes(model):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t

        torch.manual_seed(0)
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=half),
        ):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    saved = saved_bytes(stock) - saved_bytes(fused)
    # silu(g) and h: two (tokens x intermediate) tensors per layer, less the small LoRA parts
    assert saved >= 0.9 * 2 * 2 * ids.numel() * INTER * (2 if half else 4)


@pytest.mark.parametrize("case", ["disabled", "dora", "merged", "other-dtype", "two-adapters"])
def test_any_other_call_runs_the_models_own_forward(calls, case):
    stock, fused = _pair(use_dora=case == "dora")
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
        if case == "disabled":
            with model.disable_adapter():
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


def test_dropout_same_masks_and_gradients_as_peft(calls):
    """LoRA dropout on each projection's LoRA input, as peft draws it: from the same RNG state
    the fused path gets the same masks (regenerated in the backward, not kept), so the same loss
    and gradients, and leaves the RNG where peft's forward leaves it."""
    stock, fused = _pair(lora_dropout=0.3)
    ids = torch.randint(0, 100, (3, 9))
    results, rng_after = [], []
    for model in (stock, fused):
        torch.manual_seed(1)
        results.append(_loss_and_grads(model, ids))
        rng_after.append(torch.get_rng_state())
    assert calls[0] == 2
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(rng_after[0], rng_after[1])
    torch.manual_seed(2)  # other masks: other gradients (the dropout really applies)
    _, grads_c = _loss_and_grads(fused, ids)
    assert not torch.allclose(
        grads_c["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"],
        grads_b["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"],
    )


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_autocast_over_a_bf16_base_with_fp32_lora(calls, autocast):
    """The GPU default: bf16 base weights, fp32 LoRA weights (peft's layout), bf16 autocast, LoRA
    dropout (and the same without autocast: then peft sums each LoRA branch in fp32). Both paths round to bf16 (8 significant bits, 2^-8 = 0.4% per rounding) in
    different places (one fused add instead of a multiply and an add, other summation orders),
    so they are compared with the fp32 computation of the same weights and masks: the fused
    path must be as close to it as the model's own bf16 forward is (within 1.5x; the own
    forward's gradients are 2-7% off the fp32 ones on this model), and within 5% of that
    forward's gradients."""
    stock, fused = _pair(base_dtype=torch.bfloat16, lora_dropout=0.1)
    lora_a = stock.base_model.model.model.layers[0].mlp.gate_proj.lora_A.default.weight
    assert lora_a.dtype == torch.float32  # peft's layout over a half base
    exact = copy.deepcopy(stock).float()
    ids = torch.randint(0, 100, (3, 9))
    results = []
    for model, half in ((stock, autocast), (fused, autocast), (exact, False)):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            results.append(_loss_and_grads(model, ids))
    assert calls[0] == 2
    (loss_a, grads_a), (loss_b, grads_b), (_, grads_x) = results
    assert loss_b.dtype == loss_a.dtype
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=0)
    for name in grads_x:
        err_own = _relative_error(grads_a[name], grads_x[name])
        err_fused = _relative_error(grads_b[name], grads_x[name])
        assert grads_b[name].dtype == grads_a[name].dtype == torch.float32, name
        assert err_fused <= 1.5 * err_own + 1e-3, (name, err_fused, err_own)
        assert _relative_error(grads_b[name], grads_a[name]) < 5e-2, name


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_nf4_base_dequantized_inside_the_function(calls, tmp_path, compute):
    """A 4-bit NF4 base (bitsandbytes, QLoRA) runs fused, each weight dequantized per layer in
    the forward and again in the backward, with dropout: the same loss and gradients as peft's
    own `Linear4bit` forward: fp32 compute to float rounding; QLoRA's GPU default (bf16 compute,
    bf16 autocast, fp32 LoRA weights) within the bf16 bound of the test above."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=True,
    )
    settings = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear")
    models = []
    for _ in range(2):
        base = LlamaForCausalLM.from_pretrained(
            tmp_path, quantization_config=quant, device_map="cpu", dtype=compute
        )
        keep_bnb_4bit_cpu_weights_unpacked(base)  # as training loads it (not a bf16 CPU kernel)
        torch.manual_seed(3)  # the same LoRA weights in both
        model = get_peft_model(base, settings)
        model.train()  # from_pretrained returns eval mode: no dropout
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)
        models.append(model)
    stock, fused = models
    assert (
        type(stock.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    )
    assert install_fused_lora_mlps(fused) == 2
    ids = torch.randint(0, 100, (2, 11))
    results = []
    half = compute != torch.float32
    for model in (stock, fused):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=compute, enabled=half):
            results.append(_loss_and_grads(model, ids))
    assert calls[0] == 2
    (loss_a, grads_a), (loss_b, grads_b) = results
    if half:
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=0)
        assert all(_relative_error(grads_b[n], grads_a[n]) < 5e-2 for n in grads_a)
    else:
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)
    assert lora_mlp.fused_mlp_status(fused) == {"used": True}
    assert lora_mlp.fused_mlp_status(stock)["used"] is False


def test_status_says_why_the_fused_path_did_not_run():
    _, fused = _pair(use_dora=True)
    ids = torch.randint(0, 100, (2, 7))
    assert lora_mlp.fused_mlp_status(fused) == {"used": False, "reason": "no training forward ran"}
    fused(input_ids=ids)
    status = lora_mlp.fused_mlp_status(fused)
    assert status["used"] is False and "DoRA" in status["reason"]
