"""The one greedy-generation helper: a left-padded batch of prompts of different lengths gets the
answers `model.generate(do_sample=False)` gives, batched and each prompt alone; GRPO's own
rollout loop, run greedily, picks the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.models.greedy import greedy_generate, left_pad
from peftkit.objectives.rollouts import sample_completions

PAD = 0
PROMPTS = [[5, 9, 3], [7, 2, 11, 4, 8, 6, 13], [12, 14, 15, 16, 17]]  # 3, 7 and 5 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def _generate(model, ids, mask, n):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD
    )
    return out[:, ids.shape[1] :].tolist()


def test_left_pad_right_aligns_each_prompt():
    ids, mask = left_pad(PROMPTS, PAD)
    assert ids.shape == mask.shape == (3, 7)
    for row, m, p in zip(ids.tolist(), mask.tolist(), PROMPTS):
        assert row[7 - len(p) :] == p and set(row[: 7 - len(p)]) <= {PAD}
        assert m == [0] * (7 - len(p)) + [1] * len(p)


def test_greedy_equals_generate_on_a_left_padded_batch(model):
    ids, mask = left_pad(PROMPTS, PAD)
    batched = _generate(model, ids, mask, 8)  # no stop token: every row runs 8 tokens
    alone = [_generate(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 8)[0]
             for p in PROMPTS]  # fmt: skip
    got = greedy_generate(model, PROMPTS, PAD, [], 8)
    assert got == batched == alone
    assert len({tuple(g) for g in got}) > 1  # the rows differ: padding did not blur them


def test_each_row_ends_at_its_own_first_stop_token(model):
    free = greedy_generate(model, PROMPTS, PAD, [], 8)
    stop = free[1][3]  # the 4th token of the longest prompt's answer
    first = free[1].index(stop)
    got = greedy_generate(model, PROMPTS, PAD, [stop], 8)
    assert got[1] == free[1][:first]
    assert (
        greedy_generate(model, PROMPTS, PAD, [stop], 8, keep_stop=True)[1] == free[1][: first + 1]
    )
    for answer, full in zip(got, free):  # every other row: cut at its own first stop, if any
        assert answer == full[: full.index(stop)] if stop in full else answer == full


def test_rollout_loop_run_greedily_picks_the_same_tokens(model):
    ids, mask = left_pad(PROMPTS, PAD)
    tokens, keep, _ = sample_completions(model, ids, mask, [0, 1, 2], 8, [63], PAD, greedy=True)
    rolled = [[t for t, k in zip(row, m) if k] for row, m in zip(tokens.tolist(), keep.tolist())]
    assert rolled == greedy_generate(model, PROMPTS, PAD, [63], 8, keep_stop=True)
