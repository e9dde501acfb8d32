"""Agent turns in chat rows: tool calls, tool results, the tools list and reasoning.

Rows use the OpenAI shape, which chat templates read:
  {"role": "assistant", "content": "...", "reasoning_content": "...",
   "tool_calls": [{"id": "call_1", "type": "function",
                   "function": {"name": "send_order", "arguments": {"item": "tea"}}}]}
  {"role": "tool", "tool_call_id": "call_1", "name": "send_order", "content": "..."}
  row "tools": [{"type": "function", "function": {"name": ..., "description": ...,
                                                    "parameters": {JSON schema}}}]
Arguments may be an object or a JSON string (made an object here: templates write it with
`tojson`); a bare function ({"name", "arguments"} / {"name", "parameters"}) is wrapped. Inline
reasoning (`<think>...</think>` before the answer) becomes `reasoning_content`. Errors are
ValueError/TypeError, which `formats.to_example` prefixes with the row's file and line.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def json_value(value: Any, what: str) -> Any:
    """A JSON string decoded (other values as they are)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not JSON: {e}") from None


def tool_list(value: Any) -> list[dict[str, Any]] | None:
    """The functions a chat may call, each as {"type": "function", "function": {"name", ...}}."""
    value = json_value(value, "tools")
    if not value:
        return None
    if not isinstance(value, list):
        raise TypeError(f"tools must be a list of functions, got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}] must be a function with a 'name' (JSON-schema shape)")
        tools.append({"type": "function", "function": function})
    return tools


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def result_text(content: Any, what: str) -> Any:
    """A tool result's content: a string, text parts, or an object/list written as JSON."""
    if content is None:
        raise KeyError(f"{what} is missing: a tool turn carries the result")
    text_parts = isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    )
    return content if isinstance(content, str) or text_parts else json.dumps(content)


def turn_fields(role: str, turn: dict[str, Any], i: int) -> dict[str, Any]:
    """The agent fields of turn `i` (already the canonical role), checked and normalised."""
    if role == "tool":
        out = {}
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                if not isinstance(turn[key], str):
                    raise TypeError(f"turn {i} {key} must be a string")
                out[key] = turn[key]
        return out
    if role != "assistant":
        return {}
    out = {}
    calls = json_value(turn.get("tool_calls"), f"turn {i} tool_calls")
    if calls:
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list):
            raise TypeError(f"turn {i} tool_calls must be a list")
        out["tool_calls"] = [_call(c, f"turn {i} tool call {j}") for j, c in enumerate(calls)]
    reasoning = next(
        (turn[k] for k in ("reasoning_content", "reasoning") if turn.get(k) is not None), None
    )
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise TypeError(f"turn {i} reasoning_content must be a string")
        out["reasoning_content"] = reasoning
    return out


def _call(call: Any, what: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise TypeError(f"{what} must be an object")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{what} needs function.name")
    arguments = function.get("arguments", function.get("parameters", {}))
    arguments = json_value(arguments, f"{what} arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"{what} arguments must be a JSON object, got {arguments!r}")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }
    if call.get("id") is not None:
        out = {"id": str(call["id"]), **out}
    return out


def split_inline_reasoning(message: dict[str, Any]) -> None:
    """`<think>R</think>answer` in an assistant's content becomes reasoning_content R."""
    content = message["content"]
    stripped = content.lstrip()
    if "reasoning_content" in message or not stripped.startswith(THINK_OPEN):
        return
    head, sep, answer = stripped[len(THINK_OPEN) :].partition(THINK_CLOSE)
    if sep:
        message["reasoning_content"] = head.strip("\n")
        message["content"] = answer.lstrip("\n")


def check_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Every tool result answers an earlier call (by tool_call_id, else by name, else the
    oldest open call; its name is filled in from the call), and every call names a tool in
    `tools` when the chat has a tools list."""
    names = tool_names(tools)
    open_calls: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            split_inline_reasoning(message)
            for j, call in enumerate(message.get("tool_calls", [])):
                name = call["function"]["name"]
                if names and name not in names:
                    close = difflib.get_close_matches(name, names, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(
                        f"turn {i} tool call {j} calls {name!r}, which is not in the tools list "
                        f"({', '.join(names)}){hint}"
                    )
                open_calls.append(call)
        elif message["role"] == "tool":
            call = _answered(open_calls, message)
            if call is None:
                said = message.get("tool_call_id") or message.get("name")
                raise ValueError(
                    f"turn {i} is a tool result{f' for {said!r}' if said else ''} that answers no "
                    "earlier tool call: an assistant turn before it must make the call "
                    "(tool_calls with a matching id or name)"
                )
            open_calls.remove(call)
            message.setdefault("name", call["function"]["name"])
            if "id" in call:
                message.setdefault("tool_call_id", call["id"])


def _answered(open_calls: list[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any] | None:
    if "tool_call_id" in result and any("id" in c for c in open_calls):
        return next((c for c in open_calls if c.get("id") == result["tool_call_id"]), None)
    if "name" in result:
        return next((c for c in open_calls if c["function"]["name"] == result["name"]), None)
    return open_calls[0] if open_calls else None


def has_agent_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or "tool_calls" in m for m in messages)
