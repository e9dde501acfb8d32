"""Command-line flags derived from the library: from an option class's fields or a function's
signature, so each default, choice and bound is typed once, where the library defines it.

A field or parameter `max_new_tokens: int = Field(default=128, gt=0)` (or
`Annotated[int, Gt(0)] = 128`) becomes `--max-new-tokens` with default 128, refusing 0 with
"must be >= 1"; a Literal becomes `choices` (in a union, its Literal member: the words a command
line can give); a bool False becomes a switch, a bool True `--no-X`; a parameter without a default
becomes a required flag. Help comes from the field's docstring or the function's "Args:" section.
"""

from __future__ import annotations

import argparse
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import annotated_types as at
from pydantic import BaseModel


@dataclass
class Param:
    name: str
    annotation: Any
    default: Any
    help: str | None
    constraints: tuple[Any, ...] = ()


def number(kind: type, low: float, inclusive: bool = True, high: float | None = None):
    """An argparse type: a `kind` number >= low (> low unless inclusive), <= high if given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        too_low = value < low if inclusive else value <= low
        if too_low or (high is not None and value > high) or value != value:  # NaN
            bound = f"{'>=' if inclusive else '>'} {low}" + (
                f" and <= {high}" if high is not None else ""
            )
            raise argparse.ArgumentTypeError(f"must be {bound} (got {text})")
        return value

    return parse


def model_params(model: type[BaseModel], names: Iterable[str] | None = None) -> list[Param]:
    """The fields of a pydantic option class (all, or `names` in that order)."""
    fields = model.model_fields
    return [
        Param(
            n,
            fields[n].annotation,
            fields[n].default,
            fields[n].description,
            tuple(fields[n].metadata),
        )
        for n in (names or fields)
    ]


def in_unit(p: Param, name: str, factor: float, unit: str) -> Param:
    """`p` as a flag `name` in another unit (a seconds field as milliseconds: factor 1000), its
    default and bounds multiplied by `factor`; the caller divides the flag's value by it."""
    scaled = []
    for c in p.constraints:
        for kind, field in ((at.Gt, "gt"), (at.Ge, "ge"), (at.Lt, "lt"), (at.Le, "le")):
            if isinstance(c, kind):
                c = kind(getattr(c, field) * factor)
        scaled.append(c)
    text = f"{p.help} ({unit})" if p.help else f"in {unit}"
    return Param(name, p.annotation, p.default * factor, text, tuple(scaled))


def signature_params(func: Callable[..., Any], names: Iterable[str]) -> list[Param]:
    """The keyword parameters `names` of a library function, with their docstring help. Only
    their annotations are evaluated (the function may name other types it imports lazily)."""
    names = list(names)
    wanted = types.SimpleNamespace(__annotations__={n: func.__annotations__[n] for n in names})
    hints = typing.get_type_hints(wanted, func.__globals__, include_extras=True)
    signature = inspect.signature(func)
    helps = _docstring_args(inspect.getdoc(func) or "")
    return [Param(n, hints[n], signature.parameters[n].default, helps.get(n)) for n in names]


def add_flags(
    parser: argparse.ArgumentParser,
    params: Iterable[Param],
    *,
    optional: bool = False,
    help_suffix: str = "",
) -> None:
    """One flag per parameter. `optional`: the flag defaults to None (the library's own default,
    e.g. the recipe's value, applies when it is not given)."""
    for p in params:
        flag = "--" + p.name.replace("_", "-")
        kind, constraints = _unwrap(p.annotation)
        constraints = (*constraints, *p.constraints)
        text = (p.help or "").replace("%", "%%") + help_suffix
        if kind is bool and not optional:
            if p.default:
                parser.add_argument(
                    f"--no-{p.name.replace('_', '-')}", dest=p.name, action="store_false", help=text
                )
            else:
                parser.add_argument(flag, action="store_true", help=text)
            continue
        kwargs: dict[str, Any] = {"default": None if optional else p.default, "help": text or None}
        if p.default is inspect.Parameter.empty:
            kwargs = {"required": True, "help": text or None}
        if typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif kind in (int, float):
            kwargs["type"] = _bounded(kind, constraints)
        parser.add_argument(flag, **kwargs)


def _unwrap(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """(the base type, its annotated constraints), without `| None` and `Annotated`."""
    constraints: tuple[Any, ...] = ()
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        constraints = tuple(extra)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        words = [a for a in rest if typing.get_origin(a) is typing.Literal]
        if len(rest) == 1 or len(words) == 1:  # the other members are for Python callers
            inner, more = _unwrap(rest[0] if len(rest) == 1 else words[0])
            return inner, (*constraints, *more)
    return annotation, constraints


def _bounded(kind: type, constraints: Iterable[Any]) -> Callable[[str], Any]:
    low, inclusive, high = -math.inf, True, None
    for c in constraints:
        if isinstance(c, at.Gt):
            low, inclusive = (c.gt + 1, True) if kind is int else (c.gt, False)
        elif isinstance(c, at.Ge):
            low, inclusive = c.ge, True
        elif isinstance(c, at.Le):
            high = c.le
        elif isinstance(c, at.Lt):
            high = c.lt - 1 if kind is int else c.lt
    if low == -math.inf:
        return kind  # unbounded: argparse's own "invalid int value" message
    return number(kind, kind(low), inclusive, None if high is None else kind(high))


def _docstring_args(doc: str) -> dict[str, str]:
    """{name: help} from a Google-style "Args:" section."""
    helps: dict[str, str] = {}
    lines = doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []
    name = None
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if not line.startswith(" "):  # the next section
            break
        head, sep, rest = stripped.partition(": ")
        if sep and head.isidentifier() and line.startswith("    ") and not line.startswith("     "):
            name = head
            helps[name] = rest
        elif name:
            helps[name] += " " + stripped
    return helps
