"""The manual's generated pages: the recipe reference from the schema's field docstrings, the
methods table from the method registry, the objectives table from the objective registry and the
exporters table from the exporter registry. Nothing here is typed by hand, so a default, a choice or a
capability lives in one place (the schema, a method's class) and the manual cannot drift from it.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from peftkit.exporters.registry import format_of, registered_exporters
from peftkit.methods.registry import registered_methods
from peftkit.objectives.registry import registered_objectives, spec_type
from peftkit.recipe.schema import Recipe
from peftkit.section import Section

CAPABILITIES = {
    "mergeable": "merges into the base (export to one model)",
    "full_weights": "trains the base weights (result is a whole model)",
    "lora_family": "low-rank update",
    "virtual_tokens": "virtual tokens (no packing)",
    "layerwise": "gradual unfreezing, layer-wise lr decay",
    "causal_lm": "causal LM",
    "task_heads": "task heads (classification, regression)",
}
"""The capability flags of `MethodSpec` shown in the methods table, with a short heading each."""


def _type_name(annotation: Any) -> str:
    """A reader's spelling of a field's type: `a | b` for choices, `list of X`, no module paths."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) > 1 and all(_sections(a) for a in members):
            return "section (one of several, see below)"
        names = [_type_name(a) for a in members]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__} of {inner}" if inner else origin.__name__
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f"`{m.value}`" for m in annotation)
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.default_factory() if info.default is PydanticUndefined else info.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if value is None:
        return "`null`"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _bounds(info: FieldInfo) -> str:
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥"}
    found = []
    for meta in info.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return f" ({', '.join(found)})" if found else ""


def _sections(annotation: Any) -> list[type[Section]]:
    """The recipe sections a field holds: itself, the members of a union, or none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _sections(args[0])
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    if args and origin not in (list, tuple, dict):
        return [s for a in args for s in _sections(a)]
    return []


def _description(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _field_table(cls: type[Section], prefix: str) -> list[str]:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        kind = _type_name(info.annotation) + _bounds(info)
        text = info.description
        subs = _sections(info.annotation)
        if not text and len(subs) == 1 and subs[0].__doc__:
            text = _first_sentence(subs[0].__doc__)
        if (info.json_schema_extra or {}).get("resumable"):  # section.RESUMABLE
            text = f"{text or ''} May change on `--resume`.".strip()
        lines.append(f"| `{prefix}{name}` | {kind} | {_default(info)} | {_description(text)} |")
    return lines


def _discriminator(cls: type[Section]) -> tuple[str, str] | None:
    for key in ("method", "type", "format"):
        info = cls.model_fields.get(key)
        if info is not None and typing.get_origin(info.annotation) is typing.Literal:
            values = typing.get_args(info.annotation)
            if len(values) == 1:
                return key, values[0]
    return None


def _walk(cls: type[Section], prefix: str, level: int) -> Iterator[str]:
    heading = "#" * level
    tag = _discriminator(cls)
    title = prefix.rstrip(".") + (f" ({tag[0]}: {tag[1]})" if tag else "")
    yield f"{heading} `{title}`"
    yield ""
    if cls.__doc__ and cls.__doc__ is not Section.__doc__:
        yield _description(cls.__doc__.split("\n\n")[0])
        yield ""
    yield from _field_table(cls, prefix)
    yield ""
    for name, info in cls.model_fields.items():
        for sub in _sections(info.annotation):
            yield from _walk(sub, f"{prefix}{name}.", min(level + 1, 4))


def recipe_reference() -> str:
    """Markdown: every recipe key, section by section, with type, default and docstring."""
    lines = [
        "Every key a recipe can hold, generated from the schema (`peftkit/recipe/schema.py` and "
        "the sections it composes). A key left out takes the default shown; `peftkit validate "
        "RECIPE` prints a recipe with every default resolved.",
        "",
        *_field_table(Recipe, ""),
        "",
    ]
    for name, info in Recipe.model_fields.items():
        for sub in _sections(info.annotation):
            lines += list(_walk(sub, f"{name}.", 2))
    return "\n".join(lines)


def methods_table() -> str:
    """Markdown: one row per registered adapter method, with its capabilities."""
    head = " | ".join(CAPABILITIES.values())
    lines = [
        f"| method | {head} | what it is |",
        "|---|" + "---|" * len(CAPABILITIES) + "---|",
    ]
    for name, cls in registered_methods().items():
        flags = " | ".join("yes" if getattr(cls, c) else "—" for c in CAPABILITIES)
        first = _description((cls.__doc__ or "").split("\n\n")[0])
        lines.append(f"| `{name}` | {flags} | {first} |")
    return "\n".join(lines)


def _first_sentence(text: str | None) -> str:
    flat = _description(text)
    return re.split(r"(?<! al)\. ", flat, maxsplit=1)[0].rstrip(".") + "."


def _support(reason: str | None) -> str:
    return "yes" if reason is None else f"no: {reason}"


def objectives_table() -> str:
    """Markdown, from the objective registry: one row per registered objective (the
    `objective: {type: ...}` it runs, its keys, what it optimises, what the planner, GGUF export,
    serving and FSDP / DeepSpeed support for it), then each section's math as its docstring
    gives it."""
    lines = [
        "| objective | `type` | keys | what it optimises | plan | GGUF | serving | FSDP / DeepSpeed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    blocks, specs = [], []
    for name, kind in registered_objectives().items():
        value, spec, support = spec_type(kind.spec), kind.spec, kind.support
        keys = ", ".join(f"`{k}`" for k in spec.model_fields if k != "type") or "—"
        cells = [
            _support(r) for r in (support.plan, support.gguf, support.serving, support.sharded)
        ]
        lines.append(
            f"| {name} | `{value}` | {keys} | {kind.summary_line} | " + " | ".join(cells) + " |"
        )
        if spec not in specs:
            specs.append(spec)
            text = inspect.cleandoc(spec.__doc__ or "")
            blocks += [f"### `{value}`", "", "```text", text, "```", ""]
    return "\n".join([*lines, "", *blocks])


def exporters_table() -> str:
    """Markdown, from the exporter registry: one row per registered exporter (the `export.format`
    it runs, whether `--adapter-only` selects it, the serving targets it checks, what it writes)."""
    lines = [
        "| exporter | `format` | selected by | `--target` | what it writes |",
        "|---|---|---|---|---|",
    ]
    for name, cls in registered_exporters().items():
        if cls.precedence > 0:
            how = "the run (before the flags)"
        else:
            how = "`--adapter-only`" if cls.adapter_only else "no `--adapter-only`"
        targets = ", ".join(cls.targets) or "—"
        lines.append(
            f"| `{name}` | `{format_of(cls.spec)}` | {how} | {targets} | {_description(cls.what)} |"
        )
    return "\n".join(lines)


GENERATED = {
    "recipe-reference": recipe_reference,
    "methods-table": methods_table,
    "objectives-table": objectives_table,
    "exporters-table": exporters_table,
}
"""What `<!-- peftkit:NAME -->` in a docs page is replaced with when the manual is built."""


def fill(markdown: str) -> str:
    """`markdown` with each `<!-- peftkit:NAME -->` marker replaced by its generated text."""
    for name, make in GENERATED.items():
        marker = f"<!-- peftkit:{name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
