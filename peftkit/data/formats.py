"""Normalise the common row layouts into one `Example` type.

Layouts (detected from the first row's keys, or declared per source):
  messages           {"messages": [{"role": "user"|"assistant"|"system"|"tool", "content": "..."}]}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}
  alpaca             {"instruction": ..., "input": optional, "output": ..., "system": optional}
  prompt_completion  {"prompt": "...", "completion": "..."} (or lists of messages for both)
  text               {"text": "..."}

Chats may carry agent turns (`peftkit.data.agent` checks them): an assistant turn's
`tool_calls` and `reasoning_content`, `tool` turns with the results, and the row's `tools`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.data import agent
from peftkit.data.sources import RawRow
from peftkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",  # LLaMA-Factory's names for a tool call and its result
    "function_call": "assistant",
}


@dataclass
class Example:
    """One training row in canonical form: exactly one of messages, (prompt, completion), text."""

    origin: str
    messages: list[dict[str, Any]] | None = None
    """Turns {"role", "content"}; assistant turns may add `tool_calls` (OpenAI shape, arguments
    as objects) and `reasoning_content`, tool turns `tool_call_id` and `name`."""
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None
    """The functions the chat may call (OpenAI shape: {"type": "function", "function": {...}})."""


def detect_format(row: RawRow) -> str:
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{row.origin}: cannot tell the data format from the keys {sorted(keys)}; expected messages, "
        "conversations (sharegpt), instruction+output (alpaca), prompt+completion or text, "
        "or declare it with data.train[...].format"
    )


def to_example(
    row: RawRow,
    fmt: str,
    system_prompt: str | None,
    tools: list[dict[str, Any]] | None = None,
) -> Example:
    """Convert one raw row; a row that does not fit its format is a `DataError` naming its origin.
    `tools`: the data set's function list (`data.tools`), for chats whose row has none."""
    try:
        example = _CONVERTERS[fmt](row.data, row.origin)
        if example.messages is not None:
            own = row.data.get("tools")
            example.tools = agent.tool_list(own) if own else agent.tool_list(tools)
            agent.check_turns(example.messages, example.tools)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{row.origin}: not a valid {fmt} row: {e}") from None
    if example.messages is not None and system_prompt and example.messages[0]["role"] != "system":
        example.messages.insert(0, {"role": "system", "content": system_prompt})
    return example


def system_turn(example: Example) -> str | None:
    """A chat's leading system turn ("" when it has none); None for rows that are not chats."""
    if example.messages is None:
        return None
    first = example.messages[0]
    return first["content"] if first["role"] == "system" else ""


def _text(value: Any, what: str) -> str:
    # OpenAI content parts: [{"type": "text", "text": ...}]
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value
    ):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    return value


def text_of(value: Any, what: str) -> str:
    """A string field, or OpenAI text content parts joined; TypeError otherwise."""
    return _text(value, what)


def messages_of(items: Any, roles: dict[str, str]) -> list[dict[str, Any]]:
    """A list of {"role", "content"} turns, checked (ValueError/TypeError/KeyError otherwise)."""
    return _messages(items, "role", "content", roles)


def _messages(
    items: Any, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not items:
        raise ValueError("expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise TypeError(f"turn {i} must be an object")
        if role_key not in turn:
            raise KeyError(f"turn {i} needs {role_key!r} and {content_key!r}")
        role = roles.get(turn[role_key])
        if role is None:
            raise ValueError(
                f"turn {i} has role {turn[role_key]!r}; supported: {', '.join(sorted(roles))}"
            )
        if turn[role_key] == "function_call":  # the value is the call: {"name", "arguments"}
            turn = {"tool_calls": agent.json_value(turn.get(content_key), f"turn {i} value")}
        elif content_key not in turn and not (role == "assistant" and turn.get("tool_calls")):
            raise KeyError(f"turn {i} needs {role_key!r} and {content_key!r}")
        content = turn.get(content_key)
        if role == "tool":
            content = agent.result_text(content, f"turn {i} {content_key}")
        elif role == "assistant" and content is None and turn.get("tool_calls"):
            content = ""  # a turn that only calls tools (OpenAI writes content: null)
        out.append(
            {"role": role, "content": _text(content, f"turn {i} {content_key}")}
            | agent.turn_fields(role, turn, i)
        )
    return out


def _from_messages(data: dict[str, Any], origin: str) -> Example:
    return Example(
        origin, messages=_messages(data["messages"], "role", "content", {r: r for r in ROLES})
    )


def _from_sharegpt(data: dict[str, Any], origin: str) -> Example:
    return Example(
        origin, messages=_messages(data["conversations"], "from", "value", _SHAREGPT_ROLES)
    )


def _from_alpaca(data: dict[str, Any], origin: str) -> Example:
    instruction = _text(data["instruction"], "instruction")
    extra = _text(data.get("input") or "", "input")
    messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
    if data.get("system"):
        messages.insert(0, {"role": "system", "content": _text(data["system"], "system")})
    messages.append({"role": "assistant", "content": _text(data["output"], "output")})
    return Example(origin, messages=messages)


def _from_prompt_completion(data: dict[str, Any], origin: str) -> Example:
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
        roles = {r: r for r in ROLES}
        return Example(
            origin,
            messages=_messages(prompt, "role", "content", roles)
            + _messages(completion, "role", "content", roles),
        )
    return Example(
        origin, prompt=_text(prompt, "prompt"), completion=_text(completion, "completion")
    )


def _from_text(data: dict[str, Any], origin: str) -> Example:
    return Example(origin, text=_text(data["text"], "text"))


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}
