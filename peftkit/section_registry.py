"""A registry of classes keyed on a recipe section's tag, shared by objectives and exporters.

Each registered class has a `name`, a section class `spec` whose `<tag>: Literal["..."]` field
names its kind, a `precedence` and a `selects(...)` that tells apart classes sharing one section.
The recipe's section is the union of the registered section classes, discriminated by the tag,
and is rebuilt (through `on_change` listeners) whenever a class comes or goes.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field


class SectionRegistry:
    """Classes registered once each, by `name`; one section class per tag value."""

    def __init__(self, what: str, tag: str, tag_label: str) -> None:
        """`what`: the registered thing, in messages ("objective"); `tag`: the discriminating
        field ("type"); `tag_label`: the tag's name in messages ("objective type")."""
        self.what, self.tag, self.tag_label = what, tag, tag_label
        self._classes: dict[str, type] = {}
        self._listeners: list[Callable[[], None]] = []

    def tag_of(self, spec_cls: type) -> str:
        """The `<tag>: Literal[...]` value of a section class."""
        (name,) = typing.get_args(spec_cls.model_fields[self.tag].annotation)
        return name

    def register(self, cls: type) -> type:
        """Register `cls` under its `name`. Refused: a name registered twice, or a section class
        whose tag another registered class's different section class already has."""
        if cls.name in self._classes:
            raise ValueError(
                f"{self.what} {cls.name!r} is registered twice "
                f"({self._classes[cls.name]} and {cls})"
            )
        value = self.tag_of(cls.spec)
        for other in self._classes.values():
            if other.spec is not cls.spec and self.tag_of(other.spec) == value:
                raise ValueError(
                    f"{self.tag_label} {value!r} has two sections ({other.spec} of "
                    f"{other.name!r} and {cls.spec} of {cls.name!r}): classes of one "
                    f"{self.tag} share its section class"
                )
        self._classes[cls.name] = cls
        self._changed()
        return cls

    def unregister(self, name: str) -> None:
        """Remove a registered class (a plugin or a test that registered one for a while)."""
        del self._classes[name]
        self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every (un)registration."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def registered(self) -> dict[str, type]:
        """{name: class}, in registration order (the builtin ones first)."""
        return dict(self._classes)

    def sections(self) -> list[type]:
        """The distinct section classes, in registration order."""
        return list(dict.fromkeys(cls.spec for cls in self._classes.values()))

    def tags(self) -> list[str]:
        return [self.tag_of(spec) for spec in self.sections()]

    def union(self) -> Any:
        """The pydantic type of the section: a union of the section classes on the tag."""
        members = tuple(self.sections())
        union = members[0] if len(members) == 1 else typing.Union[members]  # noqa: UP007 - built at runtime
        return Annotated[union, Field(discriminator=self.tag)]

    def select(self, spec: Any, *args: Any) -> type | None:
        """Of the classes whose section `spec` is, the first by precedence whose
        `selects(*args)` is true; None if none is."""
        kinds = [cls for cls in self._classes.values() if type(spec) is cls.spec]
        for cls in sorted(kinds, key=lambda c: -c.precedence):
            if cls.selects(*args):
                return cls
        return None
