"""Fused vocabulary projection + cross-entropy: the plain computation's loss and gradients without
keeping logits, and only for architectures whose logits are exactly the head of the last hidden
state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from peftkit.data.encode import IGNORE
from peftkit.training.linear_ce import FUSED_HEAD_TYPES, fused_head, linear_cross_entropy_sum


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


def _tiny(model_type: str):
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
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(FUSED_HEAD_TYPES))
def test_listed_architectures_take_logits_straight_from_the_last_hidden_state(model_type):
    """What the fused loss relies on: logits == head(hidden_states[-1]), nothing applied after."""
    torch.manual_seed(0)
    model = _tiny(model_type).eval()
    ids = torch.randint(0, 64, (1, 12))
    head = fused_head(model)
    assert head is not None
    out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(head(out.hidden_states[-1]), out.logits, rtol=0, atol=0)


def test_unlisted_or_adapted_heads_are_not_fused():
    from peft import LoraConfig, get_peft_model

    assert fused_head(_tiny("gemma2")) is None  # logit soft-capping after the head
    lora_head = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["lm_head"]))
    assert fused_head(lora_head) is None


def test_under_autocast_the_head_computes_in_autocasts_dtype():
    """Mixed precision: the plain path's head runs in bf16 under autocast (fp32 weights or not),
    and so does the fused one, though the model's outputs may come back cast to fp32."""
    from peftkit.training import loss

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

    from peftkit.training import linear_ce, loss

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
