"""The OpenAI API subset peftkit serves: request bodies, response and stream-chunk shapes, errors.

Requests accept (and ignore) the fields clients commonly send that change nothing here (`user`,
`logprobs: false`, `presence_penalty: 0`, ...); fields peftkit cannot honour are refused with a
400 naming them, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftkit.adapters.generation import Completion
from peftkit.data.tool_calls import ParsedReply


class ApiError(Exception):
    """An error answer: HTTP status plus the OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerationRequest:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stop:
            raise ValueError(
                "stop: stop sequences are not supported; answers end at the adapter's own stop tokens"
            )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str
    """JSON text of the arguments object, as OpenAI sends it."""


class ToolCall(BaseModel):
    """A call an earlier assistant turn made (`messages[i].tool_calls`)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls (its content may then be null)."""
    tool_call_id: str | None = None
    """A tool turn: the call whose result it is."""
    name: str | None = None
    reasoning_content: str | None = None
    """An earlier answer's reasoning, as this server returned it (templates that keep reasoning
    in the history, as Qwen3's do, render it)."""

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content: a {self.role} message needs content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(
                f"tool_calls: only an assistant message has them, not a {self.role} one"
            )
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(
                    f"messages: content part type {part.get('type')!r} is not supported"
                )
            parts.append(part.get("text", ""))
        return "".join(parts)

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates read it: "developer" is the newer name of the system
        role, and a call's arguments are an object (templates write them with `tojson`)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        for j, call in enumerate(self.tool_calls or []):
            arguments = _arguments(call.function.arguments, f"messages.{index}.tool_calls.{j}")
            function = {"name": call.function.name, "arguments": arguments}
            out.setdefault("tool_calls", []).append(
                {"id": call.id, "type": "function", "function": function}
            )
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning_content is not None and self.role == "assistant":
            out["reasoning_content"] = self.reasoning_content
        return out


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{where}.function.arguments: not JSON: {text[:60]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}.function.arguments: a JSON object, not {text[:60]!r}")
    return value


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments object."""


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedTool(BaseModel):
    class Name(BaseModel):
        name: str

    type: Literal["function"]
    function: Name


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    default_system: bool = True
    """peftkit's own field (the openai client sends it with `extra_body`): false = no default
    system turn for messages without one (the adapter's training system prompt otherwise)."""
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    """Default: auto with tools, none without. A named function or required makes the answer
    start with the template's call opener (and the function's name), so the model writes a call;
    an answer that still holds no such call is a 422."""
    parallel_tool_calls: bool = True
    """false: only the first call of an answer is returned."""

    @model_validator(mode="after")
    def _tools(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same function name")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice: a function or 'required' needs `tools`")
        if isinstance(choice, NamedTool) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice: no tool named {choice.function.name!r} in tools "
                f"(tools: {', '.join(names)})"
            )
        return self

    @property
    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools to render (none for tool_choice 'none'), as plain dicts."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def forced(self) -> str | bool:
        """The function the answer must call, True for any (required), False if free."""
        if isinstance(self.tool_choice, NamedTool):
            return self.tool_choice.function.name
        return self.tool_choice == "required"

    def chat(self) -> list[dict[str, Any]]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ValueError("prompt: empty list")
        if any(not text for text in prompts):
            raise ValueError("prompt: the prompt is empty")
        return prompts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


def chat_response(
    rid: str, model: str, completion: Completion, reply: ParsedReply | None = None
) -> dict[str, Any]:
    """The answer; `reply` (the parsed text) brings `tool_calls` and `reasoning_content`."""
    message: dict[str, Any] = {"role": "assistant", "content": completion.text}
    finish = completion.finish_reason
    if reply is not None:
        message["content"] = reply.content if reply.content or not reply.tool_calls else None
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
            finish = "tool_calls"
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage([completion]),
    }


def chat_chunk(
    rid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def completion_response(rid: str, model: str, completions: list[Completion]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(completions)
        ],
        "usage": usage(completions),
    }


def completion_chunk(
    rid: str, model: str, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(rid: str, model: str, obj: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage([completion]),
    }
