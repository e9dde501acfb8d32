"""Generated text back into OpenAI's shape: content, reasoning and `tool_calls`.

A chat template that renders tools also fixes how the model writes a call; the family is read
off the template text (`detect_family`):

    hermes   (Hermes, Qwen2.5/3)  <tool_call>{"name": ..., "arguments": {...}}</tool_call>, once or more
    llama3   (Llama 3.1/3.2)      [<|python_tag|>]{"name": ..., "parameters": {...}}, `;`-separated
    mistral  (Mistral)            [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]

Reasoning is the text between `<think>` and `</think>` at the start of the answer (or before
`</think>` when the prompt already opened the block), kept apart from the content.

A call that does not parse (bad JSON, no name or no arguments, arguments that are not an object)
leaves the whole text as content: generated text never raises. The markers `<|python_tag|>` and
`[TOOL_CALLS]` are special tokens, which decoding usually drops, so their families also read a
text that is nothing but the call JSON as a call; so does hermes (for tokenizers whose
`<tool_call>` is special).
Each call gets a fresh `id` (9 letters and digits for mistral, whose templates require that) and
its arguments as a JSON string, as OpenAI returns them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftkit.errors import PeftkitError

Family = Literal["hermes", "llama3", "mistral"]
FAMILIES: tuple[Family, ...] = ("hermes", "llama3", "mistral")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
OPENER: dict[Family, str] = {
    "hermes": "<tool_call>",
    "llama3": "<|python_tag|>",
    "mistral": "[TOOL_CALLS]",
}
"""The text that starts a call in each family."""
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


class UnknownToolFormat(PeftkitError):
    """The chat template renders tools, but in none of the call formats peftkit parses."""


def detect_family(template: str | None) -> Family | None:
    """The call format a chat template teaches, from its text; None when it names none."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template or "[AVAILABLE_TOOLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or (
        "<|start_header_id|>" in template and '"parameters"' in template
    ):
        return "llama3"
    return None


def require_family(template: str | None) -> Family:
    """`detect_family`, or `UnknownToolFormat` saying which formats are known."""
    family = detect_family(template)
    if family is None:
        raise UnknownToolFormat(
            "the chat template writes tool calls in no format peftkit can parse (known: "
            "<tool_call> JSON as Hermes/Qwen, Llama 3.1 JSON with <|python_tag|>, Mistral "
            "[TOOL_CALLS])"
        )
    return family


class NoToolSupport(PeftkitError):
    """The chat template leaves the tools out of the prompt: the model would never see them."""


def tool_family(template: str, rendered: str, tools: list[dict[str, Any]]) -> Family:
    """The call format of a template that rendered `tools` into `rendered` (a prompt).

    Raises:
        NoToolSupport: a tool's name is not in the prompt (the template ignores `tools`).
        UnknownToolFormat: the template renders tools but writes calls in no known format.
    """
    missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in rendered]
    if missing:
        raise NoToolSupport(
            f"the chat template has no tool support (the tools {', '.join(missing)} do not "
            "appear in the prompt it renders)"
        )
    return require_family(template)


def read_tools(path: str | Path) -> list[dict[str, Any]]:
    """OpenAI tool definitions from a JSON file: a list of {"type": "function", "function":
    {"name", "description", "parameters"}}, or of the function objects alone."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeftkitError(f"{path}: cannot read tools ({e})") from None
    if not isinstance(value, list):
        raise PeftkitError(f"{path}: a JSON list of tools, not {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PeftkitError(f"{path}: tool {i} has no function name (want {{'name': ...}})")
        tools.append({"type": "function", "function": function})
    return tools


def has_reasoning(template: str | None) -> bool:
    """Whether the template knows `<think>` blocks (a reasoning model's)."""
    return bool(template) and THINK_OPEN in template


def call_opener(family: Family, name: str | None = None) -> str:
    """The start of a call, to put after the generation prompt so the model must write one
    (`tool_choice` required, or a named function when `name` is given)."""
    key = "parameters" if family == "llama3" else "arguments"
    head = {"hermes": "<tool_call>\n", "llama3": "", "mistral": "[TOOL_CALLS]["}[family]
    if name is None:
        return head + '{"name": "'
    return head + '{"name": ' + json.dumps(name) + ', "' + key + '": '


@dataclass
class ParsedReply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments": JSON text}}."""


def new_call_id(family: Family | None = None) -> str:
    if family == "mistral":
        return uuid.uuid4().hex[:9]
    return f"call_{uuid.uuid4().hex[:24]}"


def split_reasoning(text: str, started: bool = False) -> tuple[str | None, str]:
    """(reasoning, the rest). `started`: the prompt ended with `<think>`, so the answer begins
    inside the block. An unclosed block is all reasoning."""
    if not started:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        text = stripped[len(THINK_OPEN) :]
    reasoning, closed, rest = text.partition(THINK_CLOSE)
    return reasoning.strip(), rest.lstrip() if closed else ""


def _call(value: Any, family: Family) -> dict[str, Any] | None:
    """One OpenAI tool call from a parsed JSON value, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    key = "parameters" if family == "llama3" and "parameters" in value else "arguments"
    if key not in value:  # {"name": "Ada"} is an answer in JSON, not a call
        return None
    arguments = value[key]
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict) or set(value) - {"name", key, "id"}:
        return None
    return {
        "id": new_call_id(family),
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value of `text`, separated by whitespace or `;`; None if anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values or None
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _calls(values: list[Any] | None, family: Family) -> list[dict[str, Any]] | None:
    if not values:
        return None
    calls = [_call(v, family) for v in values]
    return None if any(c is None for c in calls) else calls


def _bare(text: str, family: Family) -> list[dict[str, Any]] | None:
    """Calls written without their opener (dropped as a special token): the JSON alone."""
    values = _json_values(text)
    if values and family == "mistral" and len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    return _calls(values, family)


def parse_tool_calls(text: str, family: Family | None) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool calls) of `text`; no calls and the text unchanged when it holds none that
    parse (`family` None: plain text)."""
    if family is None:
        return text, []
    stripped = text.strip()
    if family == "hermes" and "<tool_call>" in text:
        bodies = _HERMES_CALL.findall(text)
        calls = _calls([_loads(b) for b in bodies], family)
        if calls is None:
            return text, []
        return _HERMES_CALL.sub("", text).strip(), calls
    if family == "mistral" and OPENER["mistral"] in text:
        before, _, after = text.partition(OPENER["mistral"])
        calls = _mistral(after.strip())
        return (before.strip(), calls) if calls else (text, [])
    if family == "llama3" and stripped.startswith(OPENER["llama3"]):
        calls = _bare(stripped[len(OPENER["llama3"]) :], family)
        return ("", calls) if calls else (text, [])
    if stripped and stripped[0] in "{[":
        calls = _bare(stripped, family)
        return ("", calls) if calls else (text, [])
    return text, []


def _loads(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _mistral(after: str) -> list[dict[str, Any]] | None:
    """What follows [TOOL_CALLS]: a JSON list of calls, or (newer tokenizers) `name[ARGS]{...}`."""
    if after.startswith("["):
        return _bare(after, "mistral")
    calls = []
    for part in after.split("[TOOL_CALLS]"):
        name, found, args = part.partition("[ARGS]")
        if not found:
            return None
        call = _call({"name": name.strip(), "arguments": _loads(args.strip())}, "mistral")
        if call is None:
            return None
        calls.append(call)
    return calls or None


def parse_reply(
    text: str, family: Family | None, reasoning: bool = False, started: bool = False
) -> ParsedReply:
    """Content, reasoning (when `reasoning`: the template knows `<think>`) and tool calls of a
    generated answer (`family` None: no calls are read)."""
    thought = None
    if reasoning:
        thought, text = split_reasoning(text, started)
    content, calls = parse_tool_calls(text, family)
    return ParsedReply(content, thought, calls)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReplyStream:
    """`parse_reply` for text that arrives in pieces: `feed` each piece, then `finish`; both
    return OpenAI stream deltas ({"reasoning_content": ...}, {"content": ...}, {"tool_calls":
    [...]}). Text that may start a call (its opener, or JSON at the start of the answer) is held
    back and parsed when the answer is complete: a call goes out as one `tool_calls` delta per
    call, anything else as content. The deltas add up to what `parse_reply` makes of the whole
    text (`result`)."""

    def __init__(
        self, family: Family | None, reasoning: bool = False, started: bool = False
    ) -> None:
        self.family, self.reasoning, self.started = family, reasoning, started
        self.mode = "reasoning" if reasoning and started else "start" if reasoning else "content"
        self.text = ""  # everything fed
        self._buf = ""  # not yet placed
        self._held = ""  # a possible call, parsed at the end
        self._content = ""  # content sent so far
        self._lstrip = False  # content after </think> starts at its first non-space

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        self._buf += piece
        return self._drain(final=False)

    def finish(self) -> list[dict[str, Any]]:
        out = self._drain(final=True)
        if self.mode == "hold":
            rest, calls = parse_tool_calls(self._held, self.family)
            out += self._send_content(rest if calls else self._held)
            out += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
        return out

    @property
    def result(self) -> ParsedReply:
        """The whole text, parsed (its tool calls' ids are not those the deltas carried)."""
        return parse_reply(self.text, self.family, self.reasoning, self.started)

    def _send_content(self, text: str) -> list[dict[str, Any]]:
        if self._lstrip:
            text = text.lstrip()
            self._lstrip = not text
        self._content += text
        return [{"content": text}] if text else []

    def _drain(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            buf = self._buf
            if self.mode == "start":
                head = buf.lstrip()
                if THINK_OPEN.startswith(head) and not final:
                    return out  # `<think>` may still be arriving
                if head.startswith(THINK_OPEN):
                    self._buf, self.mode = head[len(THINK_OPEN) :], "reasoning"
                else:
                    self.mode = "content"
            elif self.mode == "reasoning":
                i = buf.find(THINK_CLOSE)
                if i >= 0:
                    self._buf, self.mode, self._lstrip = (
                        buf[i + len(THINK_CLOSE) :],
                        "content",
                        True,
                    )
                    out += [{"reasoning_content": buf[:i]}] if buf[:i] else []
                    continue
                keep = 0 if final else _held_back(buf, THINK_CLOSE)
                sent, self._buf = buf[: len(buf) - keep], buf[len(buf) - keep :]
                return out + ([{"reasoning_content": sent}] if sent else [])
            elif self.mode == "content":
                if self.family is None:
                    self._buf = ""
                    return out + self._send_content(buf)
                head = buf.lstrip()
                at_start = not self._content.strip()
                tag = OPENER["llama3"]
                if at_start and not final and (not head or tag.startswith(head)):
                    return out  # the answer may still turn out to be a call
                if at_start and (head[:1] in ("{", "[") or head.startswith(tag)):
                    self.mode = "hold"
                    continue
                opener = OPENER[self.family]
                i = -1 if self.family == "llama3" else buf.find(opener)
                if i >= 0:
                    out += self._send_content(buf[:i])
                    self._buf, self.mode = buf[i:], "hold"
                    continue
                keep = 0 if final or self.family == "llama3" else _held_back(buf, opener)
                self._buf = buf[len(buf) - keep :]
                return out + self._send_content(buf[: len(buf) - keep])
            else:  # hold
                self._held += buf
                self._buf = ""
                return out
