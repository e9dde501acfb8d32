"""LoRA+ (`adapter.loraplus_lr_ratio`): our optimizer groups give every parameter the learning rate
(and, for matrices, the weight decay) that peft's `create_loraplus_optimizer` gives it."""

from __future__ import annotations

import pytest
import torch

from peftkit.methods.lora import LoraSpec
from peftkit.recipe.schema import TrainSpec
from peftkit.training.optim import build_optimizer


def _per_param(optimizer) -> dict[int, tuple[float, float]]:
    return {
        id(p): (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for p in group["params"]
    }


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_groups_equal_peft(tiny_model, use_dora):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    targets = ["q_proj", "v_proj", "embed_tokens"]  # LoRA on the embedding: its own absolute lr
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora)
    )
    spec = LoraSpec(loraplus_lr_ratio=16.0, target_modules=targets, use_dora=use_dora)
    train = TrainSpec(lr=2e-4, weight_decay=0.1)
    optimizer = build_optimizer(train, model, spec.lr_scales(model, train.lr))
    assert optimizer.param_groups[0]["lr"] == train.lr  # the lr the run logs is A's, not B's
    ours = _per_param(optimizer)
    theirs = _per_param(
        create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1
        )
    )
    assert ours.keys() == theirs.keys()
    named = dict(model.named_parameters())
    for name, p in named.items():
        if not p.requires_grad:
            continue
        assert ours[id(p)][0] == pytest.approx(theirs[id(p)][0], rel=1e-12), name
        if p.ndim >= 2:  # 1-d vectors (DoRA's magnitudes): no decay here, as for every method
            assert ours[id(p)][1] == theirs[id(p)][1], name
    lrs = {round(lr, 12) for lr, _ in ours.values()}
    assert lrs == {2e-4, 2e-4 * 16, 1e-6}


def test_plain_lora_has_one_learning_rate(tiny_model):
    assert LoraSpec().lr_scales(None, 1e-3) is None
