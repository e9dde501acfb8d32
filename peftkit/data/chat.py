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

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit import _compat
from peftkit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Render = Callable[[list[dict[str, str]], bool], str]
"""(messages, add_generation_prompt) -> the rendered text (`_compat.chat_renderer`)."""

FALLBACK_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
"""Used when the tokenizer has no chat template: plain-text headers, EOS after every answer."""


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


class ChatRenderer:
    """Renders message lists with a tokenizer's chat template and locates the assistant output."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        specials = {t for t in tokenizer.all_special_tokens if t}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        alternation = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._end_of_turn = re.compile(rf"\s*({alternation})") if alternation else None
        self._renderers: dict[tuple, Render] = {}

    def _template(self, origin: str) -> Render:
        """The tokenizer's template with its special tokens as they are now (compiled once)."""
        try:
            key = (self.tokenizer.get_chat_template(), *self.tokenizer.special_tokens_map.items())
            if key not in self._renderers:
                self._renderers[key] = _compat.chat_renderer(self.tokenizer)
        except Exception as e:  # no template, or one jinja cannot compile
            raise DataError(_cannot_render(origin, e)) from None
        return self._renderers[key]

    def render(self, messages: list[dict[str, str]], origin: str) -> RenderedChat:
        template = self._template(origin)
        full = self._apply(template, messages, origin)
        spans: list[tuple[int, int, str]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = (
                self._apply(template, messages[:i], origin, add_generation_prompt=True) if i else ""
            )
            last = i == len(messages) - 1
            through = full if last else self._apply(template, messages[: i + 1], origin)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"{origin}: the chat template renders earlier turns differently once later turns "
                    "are added, so assistant turns cannot be located; set data.chat_template to "
                    "'fallback' or to a template file"
                )
            spans.append((len(before), len(through), message["content"]))
        result = RenderedChat(full, [])
        shift = 0  # characters inserted so far (EOS after turns that had no end-of-turn token)
        for start, end, content in spans:
            before_len = len(result.text)
            result.text, span, stop = self._close_turn(
                result.text, start + shift, end + shift, content
            )
            shift += len(result.text) - before_len
            result.assistant_spans.append(span)
            result.stop_tokens.add(stop)
        return result

    @staticmethod
    def _apply(
        template: Render,
        messages: list[dict[str, str]],
        origin: str,
        add_generation_prompt: bool = False,
    ) -> str:
        try:
            return template(messages, add_generation_prompt)
        except Exception as e:  # jinja raises TemplateError and friends for unsupported layouts
            raise DataError(_cannot_render(origin, e)) from None

    def _close_turn(
        self, text: str, start: int, end: int, content: str
    ) -> tuple[str, tuple[int, int], str]:
        """Find where assistant turn [start, end) ends: after its end-of-turn token, inserting EOS if none."""
        segment = text[start:end]
        needle = content.strip()
        found = segment.rfind(needle) if needle else -1
        content_end = (
            start + found + len(needle)
            if found >= 0
            else end - (len(segment) - len(segment.rstrip()))
        )
        match = self._end_of_turn.match(text, content_end, end) if self._end_of_turn else None
        if match:
            return text, (start, match.end()), match.group(1)
        eos = self.tokenizer.eos_token
        return text[:content_end] + eos + text[content_end:], (start, content_end + len(eos)), eos


def _cannot_render(origin: str, error: Exception) -> str:
    return f"{origin}: the chat template cannot render this conversation: {error}"
