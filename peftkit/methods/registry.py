"""The adapter-method registry: one module per method registers its spec class here, once.

The recipe's `adapter:` section is the union of the registered specs, keyed on `method`.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import Field

from peftkit.methods.base import MethodSpec

_METHODS: dict[str, type[MethodSpec]] = {}


def register(spec_cls: type[MethodSpec]) -> type[MethodSpec]:
    """Register a method spec class under the name in its `method: Literal[...]` field."""
    (name,) = typing.get_args(spec_cls.model_fields["method"].annotation)
    if name in _METHODS:
        raise ValueError(
            f"adapter method {name!r} is registered twice ({_METHODS[name]} and {spec_cls})"
        )
    _METHODS[name] = spec_cls
    return spec_cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def registered_methods() -> dict[str, type[MethodSpec]]:
    """{name: spec class} of every method, by name; ask a class what it can do (`MethodSpec`)."""
    return dict(sorted(_METHODS.items()))


def adapter_union() -> Any:
    """The pydantic type of the recipe's `adapter:` section: a union discriminated by `method`."""
    members = tuple(_METHODS.values())
    union = members[0] if len(members) == 1 else typing.Union[members]  # noqa: UP007 - built at runtime
    return Annotated[union, Field(discriminator="method")]
