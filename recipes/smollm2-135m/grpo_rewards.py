"""Reward functions of recipes/smollm2-135m/grpo.yaml, in TRL's signature: each gets the batch's
completions (as chat turns, the prompts being conversations) and the rows' `answer` column (the
reference JSON), and returns one number per completion.

The rewards are shaped so that the base model, which rarely answers in JSON, still gets rewards
that differ within a group (no spread, no advantage, nothing to learn): the facts of the order
mentioned at all, then a JSON object, then the right fields.
"""

from __future__ import annotations

import json


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _first_object(text: str) -> dict | None:
    decoder, start = json.JSONDecoder(), text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, dict):
                return value
        except ValueError:
            pass
        start = text.find("{", start + 1)
    return None


def facts_mentioned(completions, answer, **kwargs) -> list[float]:
    """Share of the order's values (name, item, quantity, city, day) found in the answer's text."""
    out = []
    for completion, reference in zip(completions, answer):
        text, facts = _text(completion).lower(), json.loads(reference)
        out.append(sum(str(v).lower() in text for v in facts.values()) / len(facts))
    return out


def is_json_object(completions, **kwargs) -> list[float]:
    """1 when the answer is one JSON object and nothing else, 0.5 when it contains one."""
    out = []
    for completion in completions:
        text = _text(completion).strip()
        found = _first_object(text)
        out.append(
            0.0 if found is None else 1.0 if text.startswith("{") and text.endswith("}") else 0.5
        )
    return out


def field_accuracy(completions, answer, **kwargs) -> list[float]:
    """Share of the reference's fields the answer's JSON object has right (0 without one)."""
    out = []
    for completion, reference in zip(completions, answer):
        got, want = _first_object(_text(completion)), json.loads(reference)
        out.append(
            0.0 if got is None else sum(got.get(k) == v for k, v in want.items()) / len(want)
        )
    return out
