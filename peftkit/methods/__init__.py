"""Adapter methods. Importing this package registers every method module with the registry."""

from __future__ import annotations

from peftkit.methods import (  # noqa: F401 - registration side effect
    adalora,
    any_peft,
    boft,
    full,
    ia3,
    loha,
    lokr,
    lora,
    miss,
    oft,
    probe,
    prompt,
    vera,
)
from peftkit.methods.base import ApplyContext, MethodSpec
from peftkit.methods.registry import adapter_union, method_names, registered_methods

AdapterSpec = adapter_union()

__all__ = ["AdapterSpec", "ApplyContext", "MethodSpec", "method_names", "registered_methods"]
