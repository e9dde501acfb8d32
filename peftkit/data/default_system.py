"""A chat template whose default system turn is training's system prompt.

Training gave every chat without a system turn the recipe's `data.system_prompt`
(`formats.to_example`). An exported template must do the same for a request that has none, or
every runtime that applies it (transformers, vLLM, TGI, llama.cpp) renders a prompt the model was
never trained on: many base templates insert their own default instead (SmolLM2's "You are a
helpful AI assistant named SmolLM, trained by Hugging Face").

`with_default_system` first tries the smallest change: when the template inserts a default of its
own and that text appears exactly once in it, as part of a string literal or of the template's
text, it is replaced by the training prompt (so the template still reads, and runs in simpler
Jinja engines, as before). Otherwise the template is wrapped: a leading block puts the system turn
into `messages` when the first turn is not one, which is exactly what training did. Either way the
result is kept only if it renders, for a set of probe conversations, exactly as the original
template renders them with the system turn given explicitly, and leaves conversations that bring
their own system turn unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2

RenderWith = Callable[[str, list[dict[str, str]], bool], str]
"""(template, messages, add_generation_prompt) -> the rendered text."""

REPLACED = "replaced"
WRAPPED = "wrapped"
_MARK = "PEFTKIT-SYSTEM-MARK-7f3a"
_PROBES: list[tuple[list[dict[str, str]], bool]] = [
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False),
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"},
        ],
        True,
    ),
]


class TemplateNotTransformable(ValueError):
    """Neither the replacement nor the wrapped template renders as training did."""


@dataclass
class DefaultSystem:
    template: str
    how: str
    """REPLACED (the template's own default text was replaced) or WRAPPED (a leading block adds
    the system turn)."""
    replaced_default: str | None
    """The base template's own default system prompt, when it had one."""


def with_default_system(template: str, system: str, render: RenderWith) -> DefaultSystem:
    """`template` with `system` as the system turn of conversations that have none.

    Raises:
        TemplateNotTransformable: the template does not render a leading system turn as a system
            turn (no transformed template reproduces training's rendering).
    """
    own = _own_default(template, render)
    if own:
        replaced = _replace_literal(template, own, system)
        if replaced is not None and _renders_as_training(replaced, template, system, render):
            return DefaultSystem(replaced, REPLACED, own)
    wrapped = wrap(template, system)
    if _renders_as_training(wrapped, template, system, render):
        return DefaultSystem(wrapped, WRAPPED, own)
    raise TemplateNotTransformable(
        "the chat template does not render a system turn given in the messages the way it renders "
        "its own; its default system prompt cannot be set"
    )


def wrap(template: str, system: str) -> str:
    """A leading block that inserts the system turn when the first message is not one."""
    return (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        f"{{% set messages = [{{'role': 'system', 'content': {literal(system)}}}] + messages %}}"
        "{% endif %}" + template
    )


def with_default_variables(template: str, variables: dict[str, Any]) -> str:
    """`template` whose extra variables (`data.chat_template_kwargs`, e.g. enable_thinking)
    default to the values training rendered with: a leading block sets each one the caller does
    not pass, so a runtime that applies the template with none renders as training did, and one
    that passes a value (`enable_thinking=True`) still gets it."""
    head = "".join(
        f"{{%- if {name} is not defined %}}{{%- set {name} = {_value(value)} %}}{{%- endif %}}"
        for name, value in variables.items()
    )
    return head + template


def _value(value: Any) -> str:
    """A JSON value as a Jinja literal."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(str(k))}: {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"chat_template_kwargs: {value!r} is not a JSON value")


def literal(text: str, quote: str = "'") -> str:
    """`text` as a Jinja string literal (Jinja unescapes literals like Python's unicode-escape)."""
    return quote + _escape(text, quote) + quote


def _escape(text: str, quote: str) -> str:
    escaped = text.replace("\\", "\\\\").replace(quote, "\\" + quote)
    return escaped.replace("\r", "\\r").replace("\n", "\\n")


def _own_default(template: str, render: RenderWith) -> str | None:
    """The system prompt the template inserts into a conversation without one, if any."""
    probe = [{"role": "user", "content": "Hello there"}]
    try:
        bare = render(template, probe, True)
        marked = render(template, [{"role": "system", "content": _MARK}, *probe], True)
    except Exception:  # a template that cannot render these: nothing to find
        return None
    if marked.count(_MARK) != 1:
        return None
    before, after = marked.split(_MARK)
    if not (bare.startswith(before) and bare.endswith(after)) or len(bare) < len(before + after):
        return None
    own = bare[len(before) : len(bare) - len(after)]
    return own or None


def _replace_literal(template: str, own: str, system: str) -> str | None:
    """The template with its one occurrence of `own` replaced, escaped for where it stands (a
    string literal or the template's text); None if it does not occur exactly once."""
    if template.count(own) != 1:
        return None
    at, pos = template.index(own), 0
    for _, kind, value in jinja2.Environment().lex(template):
        start = template.index(value, pos)
        pos = start + len(value)
        if not start <= at < pos:
            continue
        if at + len(own) > pos:  # spans tokens: not a plain piece of text
            return None
        if kind == "string":
            new = _escape(system, value[0])
        elif kind == "data":
            new = "{{ " + literal(system) + " }}"
        else:
            return None
        return template[:at] + new + template[at + len(own) :]
    return None


def _renders_as_training(candidate: str, original: str, system: str, render: RenderWith) -> bool:
    """Without a system turn the candidate renders what the original renders with `system`
    given; with one, exactly what the original renders."""
    try:
        for messages, generation in _PROBES:
            given = [{"role": "system", "content": system}, *messages]
            if render(candidate, messages, generation) != render(original, given, generation):
                return False
            other = [{"role": "system", "content": "Another instruction."}, *messages]
            if render(candidate, other, generation) != render(original, other, generation):
                return False
    except Exception:  # a candidate (or original) that fails on a probe is not kept
        return False
    return True


def tokenizer_renderer(tokenizer) -> RenderWith:
    """Render with `tokenizer`'s special tokens (as transformers' `apply_chat_template` does)."""

    def render(template: str, messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )

    return render
