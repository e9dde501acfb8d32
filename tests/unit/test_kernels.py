"""`apply_kernels` is the one step that installs the fused paths, and its report says what each
path did in the training forwards since: not merely that it was installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.kernels.apply import apply_kernels
from peftkit.objectives.loss import causal_lm_loss_sum


@dataclass
class _Choices:
    """What a run's objective tells the kernels: no packing, the loss claims the fused head."""

    varlen: bool = False

    def fused_head_status(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"used": True}


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear"))


def test_report_says_what_ran_since_apply():
    model = _model()
    kernels = apply_kernels(model, _Choices())
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():  # evaluation forwards are not training: nothing counts
        causal_lm_loss_sum(model, batch, supervised_only=True)
    before = kernels.report(model, _Choices())["speedups"]
    assert before["fused_mlp"] == {"used": False, "reason": "no training forward ran"}
    assert before["fused_head"] == {"used": False, "reason": "no training forward ran"}
    assert before["varlen_attention"]["used"] is False

    causal_lm_loss_sum(model, batch, supervised_only=True).backward()
    report = kernels.report(model, _Choices())
    assert report["speedups"]["fused_mlp"] == {"used": True}
    assert report["speedups"]["fused_head"] == {"used": True}
    assert report["attention"] == "sdpa"

    apply_kernels(model, _Choices())  # a new run's setup starts the counts afresh
    assert kernels.report(model, _Choices())["speedups"]["fused_head"]["used"] is False
