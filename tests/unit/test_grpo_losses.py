"""GRPO's loss equals TRL 1.16's `GRPOTrainer._compute_loss`: the same LoRA model, prompts,
completions, advantages, sampling log-probs and reference log-probs go through TRL's own method
and through `peftkit.objectives.grpo_losses`; the losses and every LoRA gradient agree to 1e-5, for
each loss type, with and without the KL term, at token and at sequence level (GSPO), with the
policy's log-probs from the plain per-row forward and from the shared-prefix forward (each
group's prompt run once, objectives/shared_prefix.py) that GRPO runs."""

from __future__ import annotations

import math

import pytest
import torch

from peftkit import _compat
from peftkit.objectives.grpo_losses import completion_logps, group_advantages, policy_loss
from peftkit.objectives.shared_prefix import group_prompts, shared_prefix_logps

pytestmark = pytest.mark.filterwarnings("ignore")

G, PROMPTS, T, TEMPERATURE = 4, 2, 6, 0.7


def _reward(completions, **_):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def trl_setup(tiny_model, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)

    def trainer_for(**options):
        args = GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("grpo")),
            per_device_train_batch_size=G * PROMPTS,
            num_generations=G,
            max_completion_length=T + 2,
            temperature=TEMPERATURE,
            use_cpu=True,
            report_to=[],
            bf16=False,
            max_steps=1,
            **options,
        )
        trainer = GRPOTrainer(
            model=base,
            reward_funcs=[_reward],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "hello"}] * 8),
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0
            ),
        )
        trainer.current_gradient_accumulation_steps = 1
        torch.manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:  # a trained adapter, so policy != reference
                p.data.normal_(0, 0.05)
        return trainer

    return trainer_for, tokenizer


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    b = G * PROMPTS
    # the G completions of a prompt share it, as rollouts lay them out
    prompt_ids = torch.randint(3, vocab, (PROMPTS, 5), generator=g).repeat_interleave(G, dim=0)
    prompt_mask = torch.ones(b, 5, dtype=torch.long)
    prompt_mask[:G, :2] = 0  # a left-padded prompt
    completion_ids = torch.randint(3, vocab, (b, T), generator=g)
    completion_mask = torch.ones(b, T, dtype=torch.long)
    completion_mask[1, 3:] = 0  # a completion that ended early
    completion_mask[5, 1:] = 0
    advantages = torch.randn(b, generator=g)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, advantages


CASES = [
    ("grpo", 0.0, "token"),
    ("grpo", 0.04, "token"),
    ("grpo", 0.04, "sequence"),
    ("bnpo", 0.04, "token"),
    ("dr_grpo", 0.04, "token"),
    ("dapo", 0.0, "token"),
    ("dapo", 0.04, "token"),
]


@pytest.mark.parametrize("forward", ["rows", "shared_prefix"])
@pytest.mark.parametrize(
    ("loss_type", "beta", "level"), CASES, ids=[f"{a}-b{b}-{c}" for a, b, c in CASES]
)
def test_loss_and_lora_gradients_equal_trl(trl_setup, loss_type, beta, level, forward):
    trainer_for, _ = trl_setup
    trainer = trainer_for(
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        importance_sampling_level=level,
    )
    model = trainer.model
    model.train()
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = _batch(
        model.config.vocab_size
    )
    with torch.no_grad():
        logps = completion_logps(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE
        )
        # sampled by an older policy: ratios away from 1, some beyond the clip range
        noise = torch.Generator().manual_seed(2)
        old = logps + 0.3 * torch.randn(logps.shape, generator=noise)
        old = old + 0.4 * torch.randn(logps.shape[0], 1, generator=noise)  # whole sequences drift
        with model.disable_adapter():
            ref = completion_logps(
                model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE
            )
    items = completion_mask.sum()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": items,
        **({"ref_per_token_logps": ref} if beta else {}),
    }
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in lora.items()}

    model.zero_grad()
    if forward == "rows":
        logps = completion_logps(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE
        )
    else:
        ids, mask = group_prompts(prompt_ids, prompt_mask, G)
        logps = shared_prefix_logps(
            model,
            ids,
            mask,
            completion_ids,
            completion_mask,
            G,
            TEMPERATURE,
            _compat.cache_keyword(model),
        )
    mine = policy_loss(
        logps,
        old,
        ref if beta else None,
        advantages,
        completion_mask,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        importance_sampling_level=level,
        max_completion_length=T + 2,
        generation_batch_tokens=items.float(),
    )
    mine.loss.backward()

    assert mine.loss.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-5)
    assert their_grads and any(g.abs().sum() > 0 for g in their_grads.values())
    for name, p in lora.items():
        torch.testing.assert_close(p.grad, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # the clip counts are what TRL logs as clip_ratio/low_mean and high_mean
    logged = trainer._metrics["train"]
    low = (mine.low_clipped / mine.counted).item()
    high = (mine.high_clipped / mine.counted).item()
    assert low == pytest.approx(logged["clip_ratio/low_mean"][-1], abs=1e-6)
    assert high == pytest.approx(logged["clip_ratio/high_mean"][-1], abs=1e-6)
    assert low + high > 0  # the case exercises clipping
    if beta:
        kl = (mine.kl_sum / completion_mask.sum()).item()
        assert kl == pytest.approx(logged["kl"][-1], abs=1e-6)


def _reference_advantages(rewards: list[list[float | None]], weights, g, scale):
    """TRL's advantages written out plainly, row by row (None = the function did not score)."""
    summed = []
    for row in rewards:
        if all(r is None for r in row):
            summed.append(None)
        else:
            summed.append(sum(w * r for w, r in zip(weights, row) if r is not None))

    def stats(values):
        vals = [v for v in values if v is not None]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        return mean, math.sqrt(var)

    out = []
    for start in range(0, len(summed), g):
        group = summed[start : start + g]
        mean, std = stats(group)
        if scale == "batch":
            std = stats(summed)[1]
        for v in group:
            if v is None:
                out.append(0.0)
            else:
                a = v - mean
                out.append(a / (std + 1e-4) if scale != "none" else a)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    rewards = [
        [1.0, 0.5],
        [0.0, None],
        [None, None],  # unscorable: advantage 0, out of the baseline
        [2.0, 1.0],
        [1.0, 1.0],  # a group whose rewards are all equal
        [1.0, 1.0],
        [1.0, 1.0],
        [1.0, 1.0],
    ]
    weights = [1.0, 0.5]
    table = torch.tensor([[math.nan if r is None else r for r in row] for row in rewards])
    got = group_advantages(table, torch.tensor(weights), 4, scale)
    want = _reference_advantages(rewards, weights, 4, scale)
    assert got.advantages.tolist() == pytest.approx(want, abs=1e-5)
    assert math.isnan(got.rewards[2])
    if scale == "group":
        assert got.zero_std.tolist() == [False] * 4 + [True] * 4
