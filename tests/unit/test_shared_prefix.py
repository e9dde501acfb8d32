"""The shared-prefix forward (each group's prompt once, its KV cache repeated to the group's
completions) gives the per-token log-probs and the LoRA gradients of the plain per-row forward:
left-padded prompts of different lengths in one micro-batch, right-padded completions that end
at different places, adapter dropout 0. Rollouts that prefill each prompt once sample exactly
what rollouts from repeated prompts sample."""

from __future__ import annotations

import pytest
import torch

from peftkit import _compat
from peftkit.objectives.grpo_losses import completion_logps
from peftkit.objectives.rollouts import sample_completions
from peftkit.objectives.shared_prefix import group_prompts, shared_prefix_logps, support_problem

pytestmark = pytest.mark.filterwarnings("ignore")

G, N, P, T = 3, 3, 7, 5


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    )
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: gradients reach lora_A too
            p.data.normal_(0, 0.05)
    model.train()
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, vocab, (N, P), generator=g)
    prompt_mask = torch.ones(N, P, dtype=torch.long)
    prompt_mask[0, :3] = 0  # prompts of three lengths, left-padded to one width
    prompt_mask[2, :1] = 0
    prompts = prompts.masked_fill(prompt_mask == 0, 0)
    completions = torch.randint(3, vocab, (N * G, T), generator=g)
    completion_mask = torch.ones(N * G, T, dtype=torch.long)
    completion_mask[1, 2:] = 0  # completions that ended early (right padding)
    completion_mask[4, 1:] = 0
    completion_mask[8, 4:] = 0
    completions = completions.masked_fill(completion_mask == 0, 0)
    return prompts, prompt_mask, completions, completion_mask


def _grads(model, logps, weights):
    model.zero_grad()
    (logps * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_shared_prefix_logps_and_lora_grads_equal_the_row_by_row_forward(lora_model):
    model = lora_model
    prompts, prompt_mask, completions, completion_mask = _batch(model.config.vocab_size)
    rows_ids = prompts.repeat_interleave(G, dim=0)
    rows_mask = prompt_mask.repeat_interleave(G, dim=0)
    weights = torch.randn(N * G, T, generator=torch.Generator().manual_seed(4)) * completion_mask

    plain = completion_logps(model, rows_ids, rows_mask, completions, completion_mask, 0.7)
    plain_grads = _grads(model, plain, weights)
    ids, mask = group_prompts(rows_ids, rows_mask, G)
    keyword = _compat.cache_keyword(model)
    shared = shared_prefix_logps(model, ids, mask, completions, completion_mask, G, 0.7, keyword)
    shared_grads = _grads(model, shared, weights)

    on = completion_mask.bool()
    torch.testing.assert_close(shared[on], plain[on], atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    assert any("lora_A" in n for n in plain_grads) and any("lora_B" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_one_token_completions(lora_model):
    prompts, prompt_mask, completions, completion_mask = _batch(lora_model.config.vocab_size)
    completions, completion_mask = completions[:, :1], completion_mask[:, :1]
    rows = prompts.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    plain = completion_logps(lora_model, *rows, completions, completion_mask, 1.0)
    keyword = _compat.cache_keyword(lora_model)
    shared = shared_prefix_logps(
        lora_model, prompts, prompt_mask, completions, completion_mask, G, 1.0, keyword
    )
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_group_prompts_refuses_rows_that_do_not_share_a_prompt():
    ids = torch.tensor([[1, 2], [1, 3]])
    with pytest.raises(ValueError, match="different prompts"):
        group_prompts(ids, torch.ones_like(ids), 2)


def test_support_problem_names_what_rules_the_shared_forward_out(lora_model):
    assert support_problem(lora_model, "DistributedType.NO") is None
    assert "fsdp" in support_problem(lora_model, "DistributedType.FSDP")
    assert "deepspeed" in support_problem(lora_model, "DEEPSPEED")
    lora_model.get_base_model().gradient_checkpointing_enable()
    try:
        assert "checkpointing" in support_problem(lora_model, "NO")
    finally:
        lora_model.get_base_model().gradient_checkpointing_disable()


def test_rollouts_with_a_shared_prefill_sample_what_repeated_prompts_sample(lora_model):
    lora_model.eval()
    try:
        prompts, prompt_mask, _, _ = _batch(lora_model.config.vocab_size)
        seeds = list(range(100, 100 + N * G))
        args = ([5], 0, 1.0, 1.0, 0)
        once = sample_completions(lora_model, prompts, prompt_mask, seeds, 6, *args, group=G)
        rows = prompts.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
        each = sample_completions(lora_model, *rows, seeds, 6, *args)
        for a, b in zip(once, each):
            assert torch.equal(a, b)
        assert once[0].shape == (N * G, 6)
        longest = sample_completions(
            lora_model,
            prompts,
            prompt_mask,
            seeds,
            6,
            [int(once[0][0, 0])],
            0,
            group=G,
            min_new_tokens=6,
        )
        assert bool(longest[1].all())  # the stop token is never drawn before 6 tokens
    finally:
        lora_model.train()
