"""Rewards of generated completions: the recipe's reward functions and metrics, scored together.

Each reward is called once per generation batch with TRL's reward signature,

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

where `columns` holds every other field of the data rows (e.g. `answer`), one entry per completion
(a prompt's row repeated for each of its completions), so reward functions written for TRL's
GRPOTrainer run unchanged. None means "this function does not score this completion" (it is
left out of that function's mean; a completion no function scores gets no advantage).

What a function returns is checked: a wrong count, a value that is not a number or None, a
non-finite number, or an exception stops the run with the function's name and the data row
(file and line) it was scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import RecipeError, TrainingStopped
from peftkit.objectives.answer_metrics import BUILTIN, ToolCallMetric, import_callable

RewardFn = Callable[..., Sequence[float | None]]


@dataclass
class Reward:
    """One reward, ready to call: its logged name, its weight and the callable."""

    name: str
    weight: float
    fn: RewardFn


def _metric_reward(
    metric: str, reference: str, chat_template: str | None = None, key: str = ""
) -> RewardFn:
    scorer = ToolCallMetric(chat_template, key) if metric == "tool_call" else BUILTIN[metric]
    keep = metric == "tool_call"  # (scores references given as data, not only as text)

    def reward(completions: list[Any], **columns: Any) -> list[float | None]:
        refs = columns.get(reference)
        if refs is None:
            raise KeyError(f"the data rows have no {reference!r} column to score against")
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            None
            if ref is None
            else scorer(t, ref if isinstance(ref, str) or keep else str(ref))["score"]
            for t, ref in zip(texts, refs)
        ]

    return reward


def build_rewards(
    specs: Sequence[Any], base_dir: Path | None, chat_template: str | None = None
) -> list[Reward]:
    """The recipe's rewards (`objective.rewards`: `peftkit.objectives.grpo.RewardSpec`), each
    function imported once (a bad path is a named recipe error); `chat_template` (the run's)
    fixes the call format a `tool_call` metric reads."""
    rewards = []
    for i, spec in enumerate(specs):
        if spec.function is not None:
            fn = import_callable(spec.function, base_dir, f"objective.rewards[{i}].function")
        else:
            key = f"objective.rewards[{i}].metric {spec.metric}"
            fn = _metric_reward(spec.metric, spec.reference, chat_template, key)
        rewards.append(Reward(spec.label, spec.weight, fn))
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(
            f"objective.rewards: two rewards are named {duplicates[0]!r}; give one a `name`"
        )
    return rewards


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            return _number(value.item())  # a 0-d tensor or numpy scalar
        raise TypeError(type(value).__name__)
    return float(value)


def score(
    rewards: Sequence[Reward],
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
    origins: list[str],
    conversational: bool = False,
) -> torch.Tensor:
    """(completions, rewards) float32 table of every reward's value (NaN where it returned None).
    `origins[i]` names the data row of completion i ("file.jsonl line 12") for error messages.
    `conversational` (prompts given as messages): each completion is passed as TRL passes it
    then, `[{"role": "assistant", "content": text}]`."""
    table = torch.full((len(completions), len(rewards)), math.nan)
    shown: list[Any] = (
        [[{"role": "assistant", "content": c}] for c in completions]
        if conversational
        else completions
    )
    for j, reward in enumerate(rewards):
        where = f"reward {reward.name!r}"
        try:
            values = list(
                reward.fn(
                    prompts=prompts,
                    completions=shown,
                    completion_ids=completion_ids,
                    **columns,
                )
            )
        except Exception as err:
            raise TrainingStopped(
                f"{where} raised {type(err).__name__}: {err} (scoring the completions of "
                f"{_rows(origins)}); fix the function and resume with --resume"
            ) from err
        if len(values) != len(completions):
            raise TrainingStopped(
                f"{where} returned {len(values)} values for {len(completions)} completions "
                f"({_rows(origins)}): return one reward (or None) per completion"
            )
        for i, value in enumerate(values):
            try:
                number = _number(value)
            except TypeError as err:
                raise TrainingStopped(
                    f"{where} returned {value!r} ({err}) for completion {i} of {origins[i]}: "
                    "rewards are numbers or None"
                ) from None
            if number is not None and not math.isfinite(number):
                raise TrainingStopped(
                    f"{where} returned {number} for completion {i} of {origins[i]}: rewards must "
                    "be finite (use None to leave a completion unscored)"
                )
            if number is not None:
                table[i, j] = number
    return table


def _rows(origins: list[str]) -> str:
    unique = list(dict.fromkeys(origins))
    return ", ".join(unique[:3]) + (f" and {len(unique) - 3} more rows" if len(unique) > 3 else "")


def reward_metrics(table: torch.Tensor, rewards: Sequence[Reward]) -> dict[str, float]:
    """TRL's per-function reward metrics of one generation batch: rewards/<name>/mean and /std
    over the completions that function scored."""
    out = {}
    for j, reward in enumerate(rewards):
        column = table[:, j]
        scored = column[~torch.isnan(column)]
        out[f"rewards/{reward.name}/mean"] = scored.mean().item() if scored.numel() else math.nan
        out[f"rewards/{reward.name}/std"] = scored.std().item() if scored.numel() > 1 else math.nan
    return out
