"""Chat templates and which characters of a rendered chat are assistant output.

Masks must be right even for templates without `{% generation %}` tags, so the assistant spans are
found by rendering prefixes: for assistant turn i, the text added between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])` is that turn's
output. The span ends right after the template's end-of-turn token (e.g. `<|im_end|>`,
`<|eot_id|>`, `</s>`); what the template writes after it (a newline) carries no loss. A template
that ends assistant turns with no special token gets the tokenizer's EOS inserted after each
assistant message, so the model always learns to stop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import _compat
from peftkit.data import agent
from peftkit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Render = Callable[..., str]
"""(messages, add_generation_prompt, tools, **variables) -> the rendered text
(`_compat.chat_renderer`)."""

FALLBACK_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% if tools %}{{ '### Tools:\\n' }}{% for tool in tools %}{{ tool | tojson + '\\n' }}"
    "{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '### Tool result:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ ('\\n' if message['content'] or not loop.first else '') + '<tool_call>' + "
    "{'name': call.function.name, 'arguments': call.function.arguments} | tojson + '</tool_call>' }}"
    "{% endfor %}{% endif %}{{ eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
"""Used when the tokenizer has no chat template: plain-text headers, EOS after every answer; the
tools list (one JSON function a line) heads the chat, tool calls are `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>` lines after the answer's text, tool results their own turns."""


@dataclass
class ChatTemplate:
    template: str
    source: str
    """'tokenizer', 'fallback', or the file it was read from."""


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, setting: str) -> ChatTemplate:
    """Pick the template for `data.chat_template` and install it on the tokenizer (so it is saved with it)."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if setting == "auto":
        chosen = (
            ChatTemplate(own, "tokenizer") if own else ChatTemplate(FALLBACK_TEMPLATE, "fallback")
        )
    elif setting == "tokenizer":
        if not own:
            raise DataError(
                "data.chat_template is 'tokenizer' but the tokenizer has no chat template; "
                "use 'auto' or 'fallback', or give a .jinja file"
            )
        chosen = ChatTemplate(own, "tokenizer")
    elif setting == "fallback":
        chosen = ChatTemplate(FALLBACK_TEMPLATE, "fallback")
    elif "{{" in setting or "{%" in setting:
        chosen = ChatTemplate(setting, "recipe")
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template: no such template file: {setting}")
        chosen = ChatTemplate(path.read_text(), str(path))
    tokenizer.chat_template = chosen.template
    return chosen


@dataclass
class RenderedChat:
    text: str
    assistant_spans: list[tuple[int, int]]
    """[start, end) character ranges of assistant output, each ending with its end-of-turn token."""
    stop_tokens: set[str] = field(default_factory=set)
    """End-of-turn tokens the spans end with (generation must stop on these)."""
    parts: list[tuple[int, int, str]] = field(default_factory=list)
    """[start, end, kind) of the agent parts of the text: "reasoning", "tool_call" (inside
    assistant spans) and "tool_result" (outside them), for the audit."""


REASONING_MODES = ("template", "train", "mask", "drop")


class ChatRenderer:
    """Renders message lists with a tokenizer's chat template and locates the assistant output.

    Assistant turn i starts where `render(messages[:i], add_generation_prompt=True)` ends, and
    its text is what `render(messages[:i + 1])` adds: the turn as the template writes it last,
    through its end-of-turn token. When the template writes earlier turns differently once later
    turns follow (Qwen3 drops the reasoning of turns before the last user message), the turn is
    found in the whole conversation instead: it starts where the text stops matching a render
    whose turn i begins with a marker character, and ends at its end-of-turn token.

    `reasoning`: template = as the template renders it; train = every turn's reasoning is
    supervised (an error where the template drops it); mask = rendered, carries no loss;
    drop = removed before rendering. A template that never renders `reasoning_content` gets
    the reasoning inline (`<think>R</think>` before the answer). `variables`: extra template
    variables (`enable_thinking`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        reasoning: str = "template",
        variables: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.reasoning = reasoning
        self.variables = dict(variables or {})
        specials = {t for t in tokenizer.all_special_tokens if t}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self._specials = sorted(specials, key=len, reverse=True)
        self._renderers: dict[tuple, Render] = {}
        self._probed: dict[tuple, dict[str, bool]] = {}

    def _template(self, origin: str) -> Render:
        """The tokenizer's template with its special tokens as they are now (compiled once)."""
        try:
            key = self._key()
            if key not in self._renderers:
                self._renderers[key] = _compat.chat_renderer(self.tokenizer)
        except Exception as e:  # no template, or one jinja cannot compile
            raise DataError(_cannot_render(origin, e)) from None
        return self._renderers[key]

    def _key(self) -> tuple:
        return (self.tokenizer.get_chat_template(), *self.tokenizer.special_tokens_map.items())

    def render(
        self,
        messages: list[dict[str, Any]],
        origin: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedChat:
        template = self._template(origin)
        reasonings = [m.get("reasoning_content", "").strip() for m in messages]
        if tools or agent.has_agent_turns(messages) or any(reasonings):
            messages = self._prepared(template, messages, origin, tools)

        def apply(msgs: list[dict[str, Any]], gen: bool = False) -> str:
            return self._apply(template, msgs, origin, gen, tools, self.variables)

        full = apply(messages)
        spans: list[tuple[int, int, str | None]] = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                after = spans[-1][1] if spans else 0
                spans.append(self._locate(apply, messages, i, full, after, origin))
        result = RenderedChat(full, [])
        shift = 0  # characters inserted so far (EOS after turns that had no end-of-turn token)
        for start, end, stop in spans:
            start, end = start + shift, end + shift
            if stop is None:  # no end-of-turn token: the model must still learn to stop
                stop = self.tokenizer.eos_token
                result.text = result.text[:end] + stop + result.text[end:]
                shift += len(stop)
                end += len(stop)
            result.assistant_spans.append((start, end))
            result.stop_tokens.add(stop)
        if agent.has_agent_turns(messages) or any(reasonings):
            self._mark_parts(result, messages, reasonings, origin)
        return result

    def _locate(
        self,
        apply: Callable[..., str],
        messages: list[dict[str, Any]],
        i: int,
        full: str,
        after: int,
        origin: str,
    ) -> tuple[int, int, str | None]:
        """Assistant turn i's [start, end) in `full` (at or after `after`, the previous turn's
        end) and its end-of-turn token (None: the template has none; `end` is then where the
        EOS goes)."""
        before = apply(messages[:i], True) if i else ""
        through = full if i == len(messages) - 1 else apply(messages[: i + 1])
        prefix = through.startswith(before)
        if prefix:
            turn = through[len(before) :].rstrip()
        else:
            if "reasoning_content" in messages[i]:
                raise DataError(
                    f"{origin}: message {i} has reasoning, but the chat template's generation "
                    "prompt already closes the reasoning block (thinking switched off, e.g. "
                    "data.chat_template_kwargs.enable_thinking: false); set data.reasoning: "
                    "drop, or switch thinking on"
                )
            # The history reads differently once turn i follows (Mistral's template writes the
            # system prompt only into a final user turn): the turn is what follows the text that
            # stays the same whatever the turn says.
            turn = through[_common_head(apply, messages, i, through) :].rstrip()
        stop = next((t for t in self._specials if turn.endswith(t)), None)
        if prefix and full.startswith(before) and full.startswith(turn, len(before)):
            return len(before), len(before) + len(turn), stop
        # Earlier turns read differently in the whole chat (a system prompt or the tools list
        # moved to the last user turn, as Mistral's templates do): the turn's own text is there.
        found = full.find(turn, after) if turn else -1
        if found >= 0:
            return found, found + len(turn), stop
        if stop is None:
            raise DataError(_rewrites(origin, i))
        # The turn itself reads differently (its reasoning dropped): it starts where a render
        # whose turn i begins with a marker character differs, and ends at its end-of-turn token.
        marked = {**messages[i], "content": "\x01" + messages[i]["content"]}
        other = apply([*messages[:i], marked, *messages[i + 1 :]])
        start = next((k for k, (a, b) in enumerate(zip(full, other)) if a != b), len(full))
        end = full.find(stop, start)
        content = messages[i]["content"].strip()
        if start < after or end < 0 or (content and content not in full[start:end]):
            raise DataError(_rewrites(origin, i))
        return start, end + len(stop), stop

    def _prepared(
        self,
        template: Render,
        messages: list[dict[str, Any]],
        origin: str,
        tools: list[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        """The messages as the template gets them: the tools and tool calls it must render
        (refused if it ignores them), reasoning dropped or inlined as `data.reasoning` says."""
        can = self._capabilities(template, origin)
        needed = []
        if tools and not can["tools"]:
            needed.append("the tools list")
        if any("tool_calls" in m for m in messages) and not can["tool_calls"]:
            needed.append("tool calls")
        if any(m["role"] == "tool" for m in messages) and not can["tool_results"]:
            needed.append("tool results")
        if needed:
            raise DataError(
                f"{origin}: the chat template ignores {' and '.join(needed)} (a probe chat "
                "rendered without them), so training would silently drop them; set "
                "data.chat_template: fallback (peftkit's template, which renders tools) or to a "
                ".jinja template that renders them"
            )
        out = []
        for message in messages:
            if "reasoning_content" in message:
                message = dict(message)
                reasoning = message.pop("reasoning_content")
                if self.reasoning != "drop" and reasoning.strip():
                    if can["reasoning"]:
                        message["reasoning_content"] = reasoning
                    else:
                        message["content"] = (
                            f"{agent.THINK_OPEN}\n{reasoning.strip()}\n{agent.THINK_CLOSE}\n\n"
                            + message["content"]
                        )
            out.append(message)
        return out

    def _capabilities(self, template: Render, origin: str) -> dict[str, bool]:
        """What the template renders, from probe chats: the tools list, tool calls, tool
        results and `reasoning_content` (each checked by its marker name appearing)."""
        key = (self._key(), json.dumps(self.variables, sort_keys=True, default=str))
        if key not in self._probed:
            probe = _probe_chat()

            def shows(marker: str, messages: list[dict[str, Any]], tools=None) -> bool:
                try:
                    return marker in template(messages, False, tools, **self.variables)
                except Exception:  # a template that refuses the probe cannot render it either
                    return False

            self._probed[key] = {
                "tools": shows(_PROBE_TOOL, probe[:1] + probe[-1:], _probe_tools()),
                "tool_calls": shows(_PROBE_CALL, probe, _probe_tools()),
                "tool_results": shows(_PROBE_RESULT, probe, _probe_tools()),
                "reasoning": shows(
                    _PROBE_REASONING,
                    [
                        probe[0],
                        {
                            "role": "assistant",
                            "content": "ok",
                            "reasoning_content": _PROBE_REASONING,
                        },
                    ],
                ),
            }
        return self._probed[key]

    def _mark_parts(
        self,
        chat: RenderedChat,
        messages: list[dict[str, Any]],
        reasonings: list[str],
        origin: str,
    ) -> None:
        """Where reasoning, tool calls and tool results are in the text; with `reasoning: mask`
        each span starts after its reasoning (`reasonings`: each message's, as the row had it)."""
        text, spans, position = chat.text, iter(list(chat.assistant_spans)), 0
        chat.assistant_spans = []
        for i, message in enumerate(messages):
            if message["role"] == "tool" and (result := message["content"].strip()):
                at = text.find(result, position)
                if at < 0:  # written as a JSON string (Llama 3.1's template does)
                    result = json.dumps(message["content"])
                    at = text.find(result, position)
                if at >= 0:
                    chat.parts.append((at, at + len(result), "tool_result"))
                    position = at + len(result)
            if message["role"] != "assistant":
                continue
            start, end = next(spans)
            position = head = start
            reasoning = reasonings[i] if self.reasoning != "drop" else ""
            if reasoning:
                at = text.find(reasoning, start, end)
                if at >= 0:
                    after = _THINK_END.match(text, at + len(reasoning))
                    head = after.end() if after else at + len(reasoning)
                    chat.parts.append((at, at + len(reasoning), "reasoning"))
                elif self.reasoning == "train":
                    raise DataError(
                        f"{origin}: the chat template drops the reasoning of message {i} (as "
                        "Qwen3-style templates do before the last user message), so "
                        "data.reasoning: train cannot supervise it; use data.reasoning: template "
                        "(what the template keeps) or drop"
                    )
            if "tool_calls" in message:
                content = message["content"].strip()
                found = text.find(content, head, end) if content else -1
                body_end = found + len(content) if found >= 0 else head
                tail = end - len(self._tail_token(text, start, end))
                chat.parts.append((body_end, tail, "tool_call"))
            chat.assistant_spans.append((head, end) if self.reasoning == "mask" else (start, end))
            position = end
        chat.parts.sort()

    def _tail_token(self, text: str, start: int, end: int) -> str:
        return next((t for t in self._specials if text.endswith(t, start, end)), "")

    @staticmethod
    def _apply(
        template: Render,
        messages: list[dict[str, Any]],
        origin: str,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        variables: dict[str, Any] | None = None,
    ) -> str:
        try:
            return template(messages, add_generation_prompt, tools, **(variables or {}))
        except Exception as e:  # jinja raises TemplateError and friends for unsupported layouts
            raise DataError(_cannot_render(origin, e)) from None


def _common_head(
    apply: Callable[..., str], messages: list[dict[str, Any]], i: int, through: str
) -> int:
    """Length of the text `through` (the chat up to assistant turn i) shares with the same chat
    whose turn i says something else: a marker text, and a marker tool call."""
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "\x01", "arguments": {}}}
    head = len(through)
    for other in ({"content": "\x01"}, {"content": "", "tool_calls": [call]}):
        try:
            text = apply([*messages[:i], {"role": "assistant", **other}])
        except DataError:  # a template that refuses the marker turn
            continue
        head = min(head, next((k for k, (a, b) in enumerate(zip(through, text)) if a != b), head))
    return head


_THINK_END = re.compile(rf"\s*{re.escape(agent.THINK_CLOSE)}\s*")
_PROBE_TOOL = "peftkit_probe_tool"
_PROBE_CALL = "peftkit_probe_call"
_PROBE_RESULT = "peftkit probe result"
_PROBE_REASONING = "peftkit probe reasoning"


def _probe_tools() -> list[dict[str, Any]]:
    """The probe's tools list: one function, not the one the probe calls (so that a template
    listing the tools but ignoring the calls is not taken for one that writes them)."""
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    function = {"name": _PROBE_TOOL, "description": "probe", "parameters": schema}
    return [{"type": "function", "function": function}]


def _probe_chat() -> list[dict[str, Any]]:
    call = {
        "id": "abcdefghi",  # (Mistral templates want 9 characters)
        "type": "function",
        "function": {"name": _PROBE_CALL, "arguments": {"x": "y"}},
    }
    return [
        {"role": "user", "content": "probe"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": _PROBE_CALL, "content": _PROBE_RESULT},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "probe again"},
        {"role": "assistant", "content": "ok"},
    ]


def _rewrites(origin: str, i: int) -> str:
    return (
        f"{origin}: the chat template renders earlier turns differently once later turns are "
        f"added, so assistant turn {i} (0-based message index) cannot be located; set "
        "data.chat_template to 'fallback' or to a template file"
    )


def _cannot_render(origin: str, error: Exception) -> str:
    return f"{origin}: the chat template cannot render this conversation: {error}"
