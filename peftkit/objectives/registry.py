"""The objective registry: one module per kind of run registers its `Objective` class here, once.

The recipe's `objective:` section is the union of the registered kinds' spec classes, keyed on
`type`; kinds that run the same section (sft: causal LM, multitask, task head) are told apart by
their `selects`, tried by `precedence`. Consumers ask `objective_for(recipe)` and the class it
returns; nobody branches on the kind of run.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

if TYPE_CHECKING:
    from peftkit.objectives.base import Objective, RecipeView

_OBJECTIVES: dict[str, type[Objective]] = {}
_LISTENERS: list[Callable[[], None]] = []


def spec_type(spec_cls: type) -> str:
    """The `type: Literal[...]` value of an objective section class."""
    (name,) = typing.get_args(spec_cls.model_fields["type"].annotation)
    return name


def register(cls: type[Objective]) -> type[Objective]:
    """Register an objective class under its `name`. Refused: a name registered twice, or a spec
    class whose `type` another kind's different spec class already has."""
    if cls.name in _OBJECTIVES:
        raise ValueError(
            f"objective {cls.name!r} is registered twice ({_OBJECTIVES[cls.name]} and {cls})"
        )
    kind = spec_type(cls.spec)
    for other in _OBJECTIVES.values():
        if other.spec is not cls.spec and spec_type(other.spec) == kind:
            raise ValueError(
                f"objective type {kind!r} has two sections ({other.spec} of {other.name!r} and "
                f"{cls.spec} of {cls.name!r}): kinds of one type share its section class"
            )
    _OBJECTIVES[cls.name] = cls
    for listener in _LISTENERS:
        listener()
    return cls


def unregister(name: str) -> None:
    """Remove a registered objective (a plugin or a test that registered one for a while)."""
    del _OBJECTIVES[name]
    for listener in _LISTENERS:
        listener()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener()` after every (un)registration: the recipe rebuilds its `objective:` union."""
    _LISTENERS.append(listener)


def registered_objectives() -> dict[str, type[Objective]]:
    """{name: class} of every objective, in registration order (the builtin kinds first)."""
    return dict(_OBJECTIVES)


def spec_classes() -> list[type]:
    """The distinct `objective:` section classes, in registration order."""
    return list(dict.fromkeys(cls.spec for cls in _OBJECTIVES.values()))


def objective_types() -> list[str]:
    return [spec_type(spec) for spec in spec_classes()]


def objective_union() -> Any:
    """The pydantic type of the recipe's `objective:` section: a union discriminated by `type`."""
    members = tuple(spec_classes())
    union = members[0] if len(members) == 1 else typing.Union[members]  # noqa: UP007 - built at runtime
    return Annotated[union, Field(discriminator="type")]


def objective_for(recipe: RecipeView) -> type[Objective]:
    """The kind that runs `recipe`: of those whose section is its `objective:`, the first (by
    precedence) that `selects` it."""
    kinds = [cls for cls in _OBJECTIVES.values() if type(recipe.objective) is cls.spec]
    for cls in sorted(kinds, key=lambda c: -c.precedence):
        if cls.selects(recipe):
            return cls
    raise ValueError(f"no registered objective runs objective type {recipe.objective.type!r}")
