"""The exporter registry: one module per exporter registers its `Exporter` class here, once.

The recipe's `export:` section is the union of the registered exporters' section classes, keyed on
`format` (`safetensors` when a recipe names none); exporters that run one section (merged weights,
adapter-only, a task head) are told apart by their `selects`, tried by `precedence`. `export()`
asks `exporter_for(run, spec, request)`; nobody branches on the format.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

# The classes of `peftkit.exporters.base` are named as `Any` here: base's sections ask this
# registry which format owns a key, so this module imports nothing of base (no cycle).
Exporter = ExportSection = ExportRequest = RunView = Any

DEFAULT_FORMAT = "safetensors"

_EXPORTERS: dict[str, type[Exporter]] = {}
_LISTENERS: list[Callable[[], None]] = []


def format_of(spec_cls: type) -> str:
    """The `format: Literal[...]` value of an export section class."""
    (name,) = typing.get_args(spec_cls.model_fields["format"].annotation)
    return name


def register(cls: type[Exporter]) -> type[Exporter]:
    """Register an exporter class under its `name`. Refused: a name registered twice, or a section
    class whose `format` another exporter's different section class already has."""
    if cls.name in _EXPORTERS:
        raise ValueError(
            f"exporter {cls.name!r} is registered twice ({_EXPORTERS[cls.name]} and {cls})"
        )
    fmt = format_of(cls.spec)
    for other in _EXPORTERS.values():
        if other.spec is not cls.spec and format_of(other.spec) == fmt:
            raise ValueError(
                f"export format {fmt!r} has two sections ({other.spec} of {other.name!r} and "
                f"{cls.spec} of {cls.name!r}): exporters of one format share its section class"
            )
    _EXPORTERS[cls.name] = cls
    for listener in _LISTENERS:
        listener()
    return cls


def unregister(name: str) -> None:
    """Remove a registered exporter (a plugin or a test that registered one for a while)."""
    del _EXPORTERS[name]
    for listener in _LISTENERS:
        listener()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener()` after every (un)registration: the recipe rebuilds its `export:` union."""
    _LISTENERS.append(listener)


def registered_exporters() -> dict[str, type[Exporter]]:
    """{name: class} of every exporter, in registration order (the builtin ones first)."""
    return dict(_EXPORTERS)


def section_classes() -> list[type[ExportSection]]:
    """The distinct `export:` section classes, in registration order."""
    return list(dict.fromkeys(cls.spec for cls in _EXPORTERS.values()))


def format_names() -> list[str]:
    return [format_of(spec) for spec in section_classes()]


def section_for(fmt: str) -> type[ExportSection]:
    for spec in section_classes():
        if format_of(spec) == fmt:
            return spec
    raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(format_names())}")


def _default_format(value: Any) -> Any:
    """`export: {quant: ...}` without a format is the default format's section."""
    if isinstance(value, dict) and "format" not in value:
        return {"format": DEFAULT_FORMAT, **value}
    return value


def export_union() -> Any:
    """The pydantic type of the recipe's `export:` section: a union discriminated by `format`."""
    members = tuple(section_classes())
    union = members[0] if len(members) == 1 else typing.Union[members]  # noqa: UP007 - built at runtime
    return Annotated[
        Annotated[union, Field(discriminator="format")], BeforeValidator(_default_format)
    ]


def exporter_for(run: RunView, spec: ExportSection, request: ExportRequest) -> type[Exporter]:
    """The exporter that writes `run` as `spec` asks: of those whose section `spec` is, the first
    (by precedence) that `selects` it with the request's flags."""
    kinds = [cls for cls in _EXPORTERS.values() if type(spec) is cls.spec]
    for cls in sorted(kinds, key=lambda c: -c.precedence):
        if cls.selects(run, request):
            return cls
    how = "adapter-only " if request.adapter_only else ""
    raise ValueError(f"no registered exporter writes {how}export format {spec.format!r}")
