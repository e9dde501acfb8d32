"""The exporter registry: one module per exporter registers its `Exporter` class here, once.

The recipe's `export:` section is the union of the registered exporters' section classes, keyed on
`format` (`safetensors` when a recipe names none); exporters that run one section (merged weights,
adapter-only, a task head) are told apart by their `selects`, tried by `precedence`. `export()`
asks `exporter_for(run, spec, request)`; nobody branches on the format.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

from peftkit.section_registry import SectionRegistry

# The classes of `peftkit.exporters.base` are named as `Any` here: base's sections ask this
# registry which format owns a key, so this module imports nothing of base (no cycle).
Exporter = ExportSection = ExportRequest = RunView = Any

DEFAULT_FORMAT = "safetensors"

_REGISTRY = SectionRegistry("exporter", "format", "export format")
format_of = _REGISTRY.tag_of
register = _REGISTRY.register
unregister = _REGISTRY.unregister
on_change = _REGISTRY.on_change
registered_exporters = _REGISTRY.registered
section_classes = _REGISTRY.sections
format_names = _REGISTRY.tags


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
    return Annotated[_REGISTRY.union(), BeforeValidator(_default_format)]


def exporter_for(run: RunView, spec: ExportSection, request: ExportRequest) -> type[Exporter]:
    """The exporter that writes `run` as `spec` asks: of those whose section `spec` is, the first
    (by precedence) that `selects` it with the request's flags."""
    cls = _REGISTRY.select(spec, run, request)
    if cls is not None:
        return cls
    how = "adapter-only " if request.adapter_only else ""
    raise ValueError(f"no registered exporter writes {how}export format {spec.format!r}")
