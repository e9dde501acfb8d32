"""The OpenAI API subset peftkit serves: request bodies, response and stream-chunk shapes, errors.

Requests accept (and ignore) the fields clients commonly send that change nothing here (`user`,
`logprobs: false`, `presence_penalty: 0`, ...); fields peftkit cannot honour are refused with a
400 naming them, rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftkit.adapters.generation import Completion


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


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
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


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    default_system: bool = True
    """peftkit's own field (the openai client sends it with `extra_body`): false = no default
    system turn for messages without one (the adapter's training system prompt otherwise)."""

    def chat(self) -> list[dict[str, str]]:
        # "developer" is the newer name of the system role; chat templates know "system"
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


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


def chat_response(rid: str, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage([completion]),
    }


def chat_chunk(
    rid: str, model: str, delta: dict[str, str], finish_reason: str | None = None
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
