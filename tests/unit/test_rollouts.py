"""Sampling with one generator per row: what a row draws does not depend on its batch-mates."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from peftkit.objectives.rollouts import row_seed, sample_completions


def test_a_row_samples_the_same_alone_or_in_a_batch(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    a, b = [5, 6, 7, 8], [9, 10]
    ids = torch.tensor([a, [0, 0, *b]])  # b left-padded
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    seeds = [row_seed(0, 3, "data/x.jsonl line 1", 0), row_seed(0, 3, "other/x.jsonl line 2", 0)]
    both, both_mask, _ = sample_completions(model, ids, mask, seeds, 6, [2], 0, temperature=1.0)
    alone, alone_mask, _ = sample_completions(
        model, torch.tensor([b]), torch.tensor([[1, 1]]), seeds[1:], 6, [2], 0, temperature=1.0
    )
    n = int(alone_mask.sum())
    assert both[1, :n].tolist() == alone[0, :n].tolist()
    assert int(both_mask[1].sum()) == n
    # the seed names the file and line, not the folder
    assert row_seed(0, 3, "/a/x.jsonl line 1", 0) == row_seed(0, 3, "/b/x.jsonl line 1", 0)
    assert row_seed(0, 3, "/a/x.jsonl line 1", 0) != row_seed(0, 4, "/a/x.jsonl line 1", 0)
