"""Tools in chat requests: checked against the adapter's chat template, rendered by it, and the
answer parsed back into `tool_calls` (and `reasoning_content`) by `peftkit.data.tool_calls`.

A request's `tools` reach the model only through the template (`apply_chat_template(...,
tools=...)`): a template that leaves them out of the prompt has no tool support, and the request
is refused (400) rather than answered by a model that never saw them. So is one whose template
writes calls in a format peftkit does not parse. `tool_choice` required or a named function is
enforced by prefilling: the answer starts with the family's call opener (and the function's
name), written after the generation prompt, so the model continues a call; an answer that still
holds no call of an allowed function is a 422, never passed off as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.data.tool_calls import (
    THINK_OPEN,
    Family,
    NoToolSupport,
    ParsedReply,
    ReplyStream,
    UnknownToolFormat,
    call_opener,
    has_reasoning,
    parse_reply,
    tool_family,
)
from peftkit.serving import protocol as p


@dataclass
class ToolPlan:
    """How one chat request's answer is read: which call format, whether it may reason, what
    was prefilled, and which calls it must make."""

    family: Family | None
    reasoning: bool
    started: bool
    """The prompt ends inside a `<think>` block (the template opened it)."""
    prefill: str = ""
    forced: str | bool = False
    names: tuple[str, ...] = ()
    parallel: bool = True

    def reply(self, text: str) -> ParsedReply:
        """The parsed answer (the prefill is part of it); a 422 if a forced call is missing."""
        reply = parse_reply(self.prefill + text, self.family, self.reasoning, self.started)
        reply.tool_calls = self.allowed(reply.tool_calls)
        return reply

    def allowed(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        calls = calls if self.parallel else calls[:1]
        if self.forced:
            wanted = {self.forced} if isinstance(self.forced, str) else set(self.names)
            if not calls or any(c["function"]["name"] not in wanted for c in calls):
                raise p.ApiError(422, self.missing_call(), "tool_call_not_generated")
        return calls

    def missing_call(self) -> str:
        which = f"function {self.forced!r}" if isinstance(self.forced, str) else "one of the tools"
        return (
            f"tool_choice asks for a call of {which}, but the model's answer holds no such call "
            "that parses"
        )

    def stream(self) -> ReplyStream:
        stream = ReplyStream(self.family, self.reasoning, self.started)
        stream.feed(self.prefill)  # held back: it opens a call
        return stream


def plan_tools(
    req: p.ChatRequest, template: str, rendered: str, tokenizer: Any
) -> tuple[ToolPlan, list[int]]:
    """The plan for `req` on a template (whose prompt text is `rendered`), and the token ids of
    the prefill to append to the prompt.

    Raises:
        ApiError: 400 when the template has no tool support or an unknown call format.
    """
    tools = req.active_tools
    family = None
    if tools:
        try:
            family = tool_family(template, rendered, tools)
        except (NoToolSupport, UnknownToolFormat) as e:
            raise p.ApiError(
                400,
                f"tools: `{req.model}`: {e}; send the request without tools, or serve an "
                "adapter whose template renders them",
                "invalid_request_error",
                "tools_not_supported",
            ) from None
    forced = req.forced if tools else False
    prefill = call_opener(family, forced if isinstance(forced, str) else None) if forced else ""
    reasoning = has_reasoning(template)
    plan = ToolPlan(
        family,
        reasoning,
        started=reasoning and not prefill and rendered.rstrip().endswith(THINK_OPEN),
        prefill=prefill,
        forced=forced,
        names=tuple(t["function"]["name"] for t in tools or []),
        parallel=req.parallel_tool_calls,
    )
    ids = tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    return plan, ids
