"""The objective registry: one module per kind of run registers its `Objective` class here, once.

The recipe's `objective:` section is the union of the registered kinds' spec classes, keyed on
`type`; kinds that run the same section (sft: causal LM, multitask, task head) are told apart by
their `selects`, tried by `precedence`. Consumers ask `objective_for(recipe)` and the class it
returns; nobody branches on the kind of run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.section_registry import SectionRegistry

if TYPE_CHECKING:
    from peftkit.objectives.base import Objective, RecipeView

_REGISTRY = SectionRegistry("objective", "type", "objective type")
spec_type = _REGISTRY.tag_of
register = _REGISTRY.register
unregister = _REGISTRY.unregister
on_change = _REGISTRY.on_change
registered_objectives = _REGISTRY.registered
spec_classes = _REGISTRY.sections
objective_types = _REGISTRY.tags


def objective_union() -> Any:
    """The pydantic type of the recipe's `objective:` section: a union discriminated by `type`."""
    return _REGISTRY.union()


def objective_for(recipe: RecipeView) -> type[Objective]:
    """The kind that runs `recipe`: of those whose section is its `objective:`, the first (by
    precedence) that `selects` it."""
    cls = _REGISTRY.select(recipe.objective, recipe)
    if cls is None:
        raise ValueError(f"no registered objective runs objective type {recipe.objective.type!r}")
    return cls
