"""`peftkit chat`: a multi-turn conversation with a base model and its adapters, switching adapters
on the fly. `ChatSession` keeps the conversation and answers (streaming through a callback); it
reads and prints nothing, so the command line (or a notebook) owns the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from peftkit.adapters.adapter_set import BASE, AdapterSet
from peftkit.adapters.generation import Completion, Row, SamplingOptions
from peftkit.data.tool_calls import (
    THINK_OPEN,
    NoToolSupport,
    ReplyStream,
    UnknownToolFormat,
    has_reasoning,
    parse_reply,
    tool_family,
)
from peftkit.errors import ServingError

HELP = (
    "commands: /use NAME (switch adapter; 'base' = none), /adapters, /system TEXT, /reset, "
    "/help, /quit"
)


class ChatSession:
    """A conversation with `aset`: user turns in, answers out.

    The conversation (not the adapter) is kept across /use, so the same history can be answered
    by another adapter; /reset clears it. Without a system prompt of its own (`system`, /system)
    each adapter answers with its training system prompt (`AdapterSet.system_prompt`), so /use
    swaps the instruction with the adapter.
    """

    def __init__(
        self,
        aset: AdapterSet,
        adapter: str | None,
        options: SamplingOptions,
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        """`tools`: OpenAI function definitions, rendered by the adapter's chat template; a call
        the model writes waits in `calls` for its result (`add_tool_result`, then `resume`)."""
        self.aset, self.adapter, self.options, self.system = aset, adapter, options, system
        self.tools = tools or None
        self.history: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        """The last answer's tool calls still waiting for their results (OpenAI's shape)."""
        self.reasoning: str | None = None
        """The last answer's reasoning (a `<think>` block), kept apart from its content."""

    @property
    def prompt(self) -> str:
        """The input prompt, naming the adapter in use."""
        return f"[{self.adapter or BASE}] > "

    def command(self, line: str) -> str | None:
        """Carry out a /command; returns the reply to show, or None for /quit and /exit."""
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit"):
            return None
        if command == "/use":
            try:
                self.aset.activate(arg or None)  # checks the name
            except ServingError as e:
                return str(e)
            self.adapter = None if arg in ("", BASE) else arg
            return f"using {self.adapter or 'the base model (no adapter)'}"
        if command == "/adapters":
            return ", ".join([BASE, *self.aset.names])
        if command == "/system":
            self.system = arg or None
            if self.system:
                return "system prompt set"
            default = self.aset.system_prompt(self.adapter)
            return "system prompt cleared" + (
                f" (the adapter's training one applies: {default!r})" if default else ""
            )
        if command == "/reset":
            self.history.clear()
            return "conversation cleared"
        return HELP

    def answer(self, line: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer a user turn with the adapter in use, passing each new piece of text to
        `on_text` as it is generated; the turn and its answer join the conversation. With
        tools, a call is not streamed: it lands in `calls`."""
        self.history.append({"role": "user", "content": line})
        return self._respond(on_text)

    def add_tool_result(self, call_id: str, content: str) -> None:
        """The result of a pending call, as a `tool` turn of the conversation."""
        call = next((c for c in self.calls if c["id"] == call_id), None)
        if call is None:
            raise ServingError(f"no pending tool call with id {call_id!r}")
        self.calls.remove(call)
        self.history.append(
            {
                "role": "tool",
                "tool_call_id": call_id,
                "name": call["function"]["name"],
                "content": content,
            }
        )

    def resume(self, on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer again once every pending call has its result."""
        if self.calls:
            names = ", ".join(c["function"]["name"] for c in self.calls)
            raise ServingError(f"tool calls still wait for their results: {names}")
        return self._respond(on_text)

    def _respond(self, on_text: Callable[[str], None] | None) -> Completion:
        messages = (
            [{"role": "system", "content": self.system}] if self.system else []
        ) + self.history
        aset, adapter = self.aset, self.adapter
        template = aset.chat_template(adapter)
        family, reasoning, started = None, has_reasoning(template), False
        if self.tools or reasoning:
            rendered = aset.render(aset.with_system(messages, adapter), adapter, self.tools)
            started = reasoning and rendered.rstrip().endswith(THINK_OPEN)
        if self.tools:
            try:
                family = tool_family(template, rendered, self.tools)
            except (NoToolSupport, UnknownToolFormat) as e:
                if self.history[-1]["role"] == "user":  # unanswered: not kept
                    self.history.pop()
                raise ServingError(f"tools on {adapter or BASE}: {e}") from None
        stream = ReplyStream(family, reasoning, started)

        def show(deltas: list[dict[str, Any]]) -> None:  # content and reasoning, not calls
            for delta in deltas if on_text else ():
                text = delta.get("content") or delta.get("reasoning_content")
                if text:
                    on_text(text)

        ids = aset.encode(messages, adapter, tools=self.tools)
        streamed = (lambda text: show(stream.feed(text))) if on_text else None
        row = Row(ids, adapter, self.options, aset.stop_ids(adapter), streamed)
        (completion,) = aset.generate_rows([row])
        show(stream.finish())
        reply = parse_reply(completion.text, family, reasoning, started)
        self.reasoning, self.calls = reply.reasoning, reply.tool_calls
        turn: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning is not None:  # templates that keep it in the history render it
            turn["reasoning_content"] = reply.reasoning
        if reply.tool_calls:  # templates write the arguments object with tojson
            turn["tool_calls"] = [_with_object_arguments(c) for c in reply.tool_calls]
        self.history.append(turn)
        return completion


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
