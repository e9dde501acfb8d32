"""Greedy answers to a few prompts, before and after training: the quickest check that it worked."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.models.greedy import greedy_generate


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stop_ids: list[int],
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> list[str]:
    """Answer each prompt as a single user turn (after `system_prompt`) through the chat template, greedily."""
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = greedy_generate(
            model, [ids], tokenizer.pad_token_id, stop_ids, max_new_tokens, keep_stop=True
        )[0]
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
