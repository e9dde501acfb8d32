"""Exporters, one module each, registered once: merged safetensors and the adapter (`format:
safetensors`), GGUF merged and LoRA GGUF (`format: gguf`), and the task-head model. Each declares
its `export:` section, what it refuses, its gate's limits and its build step
(`peftkit.exporters.base.Exporter`). Importing the package registers the builtin exporters."""

# Registration order is the order of the exporters table.
# isort: off
from peftkit.exporters import safetensors, gguf, head  # noqa: F401

# isort: on
from peftkit.exporters.base import (
    ExportContext,
    Exporter,
    ExportRequest,
    ExportSection,
    FidelityThresholds,
)
from peftkit.exporters.registry import (
    export_union,
    exporter_for,
    register,
    registered_exporters,
    unregister,
)

__all__ = [
    "ExportContext",
    "ExportRequest",
    "ExportSection",
    "Exporter",
    "FidelityThresholds",
    "export_union",
    "exporter_for",
    "register",
    "registered_exporters",
    "unregister",
]
