"""Reward functions with TRL's signature, task metrics as rewards, and the named errors a reward
that misbehaves stops the run with."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from peftkit.errors import RecipeError, TrainingStopped
from peftkit.objectives.grpo import RewardSpec
from peftkit.objectives.rewards import build_rewards, reward_metrics, score

REWARDS_FILE = '''
def length_reward(completions, answer, **kwargs):
    """A TRL-style reward: reads a column by name, ignores the rest."""
    assert "prompts" in kwargs and "completion_ids" in kwargs
    return [1.0 if a in c else (None if a == "skip" else 0.0) for c, a in zip(completions, answer)]

def crashes(completions, **kwargs):
    raise ValueError("boom")

def too_few(completions, **kwargs):
    return [1.0]

def words(completions, **kwargs):
    return ["high" for _ in completions]

def nan(completions, **kwargs):
    return [float("nan") for _ in completions]
'''


@pytest.fixture
def rewards_dir(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS_FILE)
    return tmp_path


def _score(rewards, completions, answers, conversational=False, **more):
    origins = [f"train.jsonl line {i + 1}" for i in range(len(completions))]
    return score(
        rewards,
        prompts=["p"] * len(completions),
        completions=completions,
        completion_ids=[[1, 2]] * len(completions),
        columns={"answer": answers, **more},
        origins=origins,
        conversational=conversational,
    )


def test_a_function_and_a_metric_scored_together(rewards_dir):
    specs = [
        RewardSpec(function="my_rewards.py:length_reward", weight=2.0),
        RewardSpec(metric="json_fields", reference="json"),
    ]
    rewards = build_rewards(specs, rewards_dir)
    assert [r.name for r in rewards] == ["length_reward", "json_fields"]
    completions = ['x {"a": 1}', '{"a": 1}', "anything"]
    json = ['{"a": 1}', '{"a": 2}', None]
    table = _score(rewards, completions, ["{", "2", "skip"], json=json)
    assert table[:, 0].tolist()[:2] == [1.0, 0.0] and math.isnan(table[2, 0])
    assert table[:2, 1].tolist() == [1.0, 0.0] and math.isnan(table[2, 1])
    m = reward_metrics(table, rewards)
    assert m["rewards/length_reward/mean"] == pytest.approx(0.5)  # the None is left out


def test_trl_reward_functions_run_unchanged():
    """TRL's own think_format_reward reads conversational completions: passed as TRL passes them."""
    from trl.rewards import think_format_reward

    from peftkit.objectives.rewards import Reward

    rewards = [Reward("think", 1.0, think_format_reward)]
    table = _score(rewards, ["<think>\nhm\n</think>\n4", "4"], ["4", "4"], conversational=True)
    assert table[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (
            "crashes",
            "reward 'crashes' raised ValueError: boom (scoring the completions of train.jsonl line 1",
        ),
        ("too_few", "reward 'too_few' returned 1 values for 2 completions"),
        ("words", "reward 'words' returned 'high' (str) for completion 0 of train.jsonl line 1"),
        ("nan", "reward 'nan' returned nan for completion 0 of train.jsonl line 1"),
    ],
)
def test_a_misbehaving_reward_stops_with_its_name_and_row(rewards_dir, function, message):
    rewards = build_rewards([RewardSpec(function=f"my_rewards.py:{function}")], rewards_dir)
    with pytest.raises(TrainingStopped) as err:
        _score(rewards, ["a", "b"], ["a", "b"])
    assert message in str(err.value)


def test_bad_reward_specs_are_named(rewards_dir):
    with pytest.raises(ValidationError, match="exactly one of `function` or `metric`"):
        RewardSpec(function="m:f", metric="exact")
    with pytest.raises(ValidationError, match="exactly one"):
        RewardSpec()
    with pytest.raises(RecipeError, match=r"objective.rewards\[0\].function: no file 'missing.py'"):
        build_rewards([RewardSpec(function="missing.py:f")], rewards_dir)
    with pytest.raises(RecipeError, match="has no function 'absent'"):
        build_rewards([RewardSpec(function="my_rewards.py:absent")], rewards_dir)
    with pytest.raises(RecipeError, match="two rewards are named 'exact'"):
        build_rewards([RewardSpec(metric="exact"), RewardSpec(metric="exact")], rewards_dir)


def test_a_tensor_reward_is_read_as_a_number(rewards_dir):
    from peftkit.objectives.rewards import Reward

    rewards = [Reward("t", 1.0, lambda completions, **_: [torch.tensor(0.5) for _ in completions])]
    assert _score(rewards, ["a"], ["a"]).tolist() == [[0.5]]


def test_tool_call_metric_as_a_reward_reads_the_template_call_format():
    from peftkit.data.chat import FALLBACK_TEMPLATE

    (reward,) = build_rewards(
        [RewardSpec(metric="tool_call", reference="call")], None, FALLBACK_TEMPLATE
    )
    call = {"name": "send_order", "arguments": {"item": "tea", "quantity": 2}}
    right = (
        '<tool_call>{"name": "send_order", "arguments": {"item": "tea", "quantity": 2}}</tool_call>'
    )
    wrong = right.replace("2}", "3}")
    references = [
        [{"type": "function", "function": {**call, "arguments": json.dumps(call["arguments"])}}],
        call,  # one {"name", "arguments"} object
        right,  # a call as the template writes it
        call,
        None,
    ]
    completions = [right, right, right, wrong, "no call"]
    table = _score([reward], completions, ["-"] * 5, call=references)
    assert table[:4, 0].tolist() == [1.0, 1.0, 1.0, 0.0] and math.isnan(table[4, 0])
    with pytest.raises(
        RecipeError, match=r"objective.rewards\[0\].metric tool_call: the chat template writes"
    ):
        build_rewards([RewardSpec(metric="tool_call")], None, "{{ messages }}")
