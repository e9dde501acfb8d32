"""Greedy answers to a few prompts, before and after training: the quickest check that it worked."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


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
    device = next(p.device for p in model.parameters())
    answers = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
