"""Fused vocabulary projection + cross-entropy: the plain computation's loss and gradients without
keeping logits, and only for architectures whose logits are exactly the head of the last hidden
state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from peftkit.data.encode import IGNORE
from peftkit.kernels.linear_ce import (
    HEAD_LOGITS,
    LogitMap,
    fused_head,
    linear_cross_entropy_sum,
    logit_map,
)


def _plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("train_weight", [False, True])
def test_same_loss_and_gradients_as_projecting_then_cross_entropy(train_weight):
    torch.manual_seed(0)
    h = torch.randn(2, 150, 24, requires_grad=True)  # 300 rows: chunks of 64 leave a remainder
    w = torch.randn(500, 24, requires_grad=train_weight)
    y = torch.randint(0, 500, (2, 150))
    y[0, :40] = IGNORE
    y[1, 130:] = IGNORE
    expected = _plain(h.reshape(-1, 24), w, y.reshape(-1)) * 0.37  # a non-unit upstream gradient
    expected.backward()
    grads = h.grad.clone(), (w.grad.clone() if train_weight else None)
    h.grad, w.grad = None, None
    got = linear_cross_entropy_sum(h, w, y, chunk_rows=64) * 0.37
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-5, atol=1e-6)
    assert h.grad[0, :40].abs().max() == 0  # rows without a target get no gradient
    if train_weight:
        torch.testing.assert_close(w.grad, grads[1], rtol=1e-5, atol=1e-5)
    else:
        assert w.grad is None


def test_no_target_at_all_is_zero_loss_and_zero_gradient():
    h = torch.randn(5, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(h, torch.randn(30, 8), torch.full((5,), IGNORE))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0


@pytest.mark.parametrize(
    "f", [LogitMap(softcap=2.0), LogitMap(scale=0.25), LogitMap(scale=3.0, softcap=1.5)]
)
def test_soft_capped_and_scaled_logits_inside_the_chunk(f):
    """f(l) = c tanh(s l / c) applied per chunk: the same loss and gradients as applying it to
    the full logits, then cross-entropy."""
    torch.manual_seed(0)
    h = torch.randn(130, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (130,))
    y[:7] = IGNORE
    logits = F.linear(h, w) * f.scale
    if f.softcap is not None:
        logits = f.softcap * torch.tanh(logits / f.softcap)
    expected = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
    expected.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None
    got = linear_cross_entropy_sum(h, w, y, chunk_rows=32, logit_map=f)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, grads[1], rtol=1e-5, atol=1e-5)


def test_fp16_gradient_survives_loss_scaling():
    """fp16 + GradScaler: the fused gradient is made before the loss scale is known. A confident
    model's gradient (p(target) ~ 1, every other probability ~ 1e-9) is all small entries, which
    flush to zero in fp16 unless cast pre-scaled; the unfused path casts them times the scale.
    The fused gradient of the scaled loss equals the unfused one's."""
    torch.manual_seed(0)
    vocab, hidden, rows = 2048, 16, 8
    w = torch.randn(vocab, hidden) * 0.05
    w[:, 0] = 0.5  # every other token's row shares a direction: their small gradients add up
    w[0] = 0.0
    w[0, 1] = 1.0
    h = (w[0].expand(rows, hidden) * 21.0).half()  # target 0's logit is ~21 above the others
    w = w.half()
    y = torch.zeros(rows, dtype=torch.long)
    scale = 2.0**16 / rows  # GradScaler's initial scale over a per-token mean
    others = torch.softmax(F.linear(h, w).double(), -1)[0, 1:]
    assert (others.half() == 0).float().mean() > 0.95  # in fp16 they would flush to zero

    unfused = h.clone().requires_grad_()
    (F.cross_entropy(F.linear(unfused, w).float(), y, reduction="sum") * scale).backward()
    fused = h.clone().requires_grad_()
    (linear_cross_entropy_sum(fused, w, y, dtype=torch.float16) * scale).backward()
    assert fused.grad.dtype == torch.float16
    assert unfused.grad[:, 0].abs().min() > 0  # the others' share, which flushing would lose
    # column 1 holds p(target) - 1, which fp32 resolves only to rounding in either path
    cols = [0, *range(2, hidden)]
    torch.testing.assert_close(
        fused.grad[:, cols].float(), unfused.grad[:, cols].float(), rtol=2e-2, atol=0
    )


def _tiny(model_type: str, **extra):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
        **extra,
    )
    return AutoModelForCausalLM.from_config(config)


# Soft-caps and scales far from 1, so that leaving them out would fail the test.
AFTER_HEAD = {
    "gemma2": {"final_logit_softcapping": 0.5},
    "gemma3_text": {"final_logit_softcapping": 0.5},
    "cohere": {"logit_scale": 4.0},
    "cohere2": {"logit_scale": 4.0},
    "granite": {"logits_scaling": 0.25},
    "granitemoe": {"logits_scaling": 0.25},
}


@pytest.mark.parametrize("model_type", sorted(HEAD_LOGITS))
def test_fused_loss_equals_each_listed_models_own_loss(model_type):
    """What the fused loss relies on, per architecture: its logits are f(head(last hidden
    state)) for the f it is registered with. Loss and every gradient equal those of the model's
    own logits (soft-capping and scaling included) under cross-entropy."""
    from peftkit.objectives import loss

    torch.manual_seed(0)
    model = _tiny(model_type, **AFTER_HEAD.get(model_type, {})).eval()
    assert fused_head(model) is not None
    if model_type in AFTER_HEAD:
        assert logit_map(model) != LogitMap()
    ids = torch.randint(1, 64, (2, 12))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = F.cross_entropy(
        logits.reshape(-1, 64).float(), labels[:, 1:].reshape(-1), reduction="sum"
    )
    expected.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    got = loss.causal_lm_loss_sum(model, batch, supervised_only=True)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_fused_loss_keeps_no_hidden_state_list_and_no_logits():
    """Only the last hidden state at the supervised positions is taken (from the head's input):
    the model is not asked for every layer's hidden state, and its head makes zero rows."""
    from peftkit.objectives import loss

    torch.manual_seed(0)
    model = _tiny("llama")
    ids = torch.randint(1, 64, (2, 20))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seen = {}

    def record(module, args, kwargs, output):
        seen["kwargs"], seen["output"] = kwargs, output

    hook = model.register_forward_hook(record, with_kwargs=True)
    loss.causal_lm_loss_sum(model, batch, supervised_only=True).backward()
    hook.remove()
    assert not seen["kwargs"].get("output_hidden_states")
    assert seen["output"].hidden_states is None
    assert seen["output"].logits.shape == (2, 0, 64)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # gradients still flow


def test_unlisted_or_adapted_heads_are_not_fused():
    from peft import LoraConfig, get_peft_model

    assert fused_head(_tiny("phi")) is None  # a head with a bias
    assert fused_head(_tiny("gpt_neox")) is None  # not listed
    lora_head = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["lm_head"]))
    assert fused_head(lora_head) is None


def test_under_autocast_the_head_computes_in_autocasts_dtype():
    """Mixed precision: the plain path's head runs in bf16 under autocast (fp32 weights or not),
    and so does the fused one, though the model's outputs may come back cast to fp32."""
    from peftkit.objectives import loss

    torch.manual_seed(0)
    model = _tiny("llama")
    ids = torch.randint(0, 64, (2, 40))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][:, :10] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss.causal_lm_loss_sum(model, batch, supervised_only=True)
        hidden, _, dtype = loss._hidden_and_targets(model, fused_head(model), batch)
        logits, targets, _ = loss._logits_and_targets(model, batch, supervised_only=True)
        plain = loss.chunked_cross_entropy_sum(logits, targets)
    assert dtype == torch.bfloat16 and hidden.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)


def test_the_fused_head_sees_through_ddp(monkeypatch):
    """A DDP run trains through DDP's wrapper: the fused head must find the model inside it, and
    the loss must take the fused path (projection and cross-entropy in one function)."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from peftkit.kernels import linear_ce
    from peftkit.objectives import loss

    torch.manual_seed(0)
    model = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    calls = []
    real = linear_ce.LinearCrossEntropy.apply
    monkeypatch.setattr(
        linear_ce.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a)
    )
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert fused_head(wrapped) is model.get_base_model().lm_head
        through_ddp = loss.causal_lm_loss_sum(wrapped, batch, supervised_only=True)
    finally:
        dist.destroy_process_group()
    assert calls == [1]
    torch.testing.assert_close(through_ddp, loss.causal_lm_loss_sum(model, batch))
