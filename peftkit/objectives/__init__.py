"""Kinds of run, one module each, registered once: causal-LM SFT, multitask, task head, DPO, ORPO,
KTO, SimPO and GRPO. Each declares its recipe section and rules, its data, its model head, its loss
and metrics, its summary lines, and what export, the planner, serving and sharded launches support
for it (`peftkit.objectives.base.ObjectiveKind`); the runtime the loop holds is
`peftkit.objectives.runtime.Objective`. Importing the package registers the builtin kinds."""

# Registration order is the order of the objectives table.
# isort: off
from peftkit.objectives import sft, multitask, task_head  # noqa: F401
from peftkit.objectives import dpo, orpo, kto, simpo, grpo  # noqa: F401

# isort: on
from peftkit.objectives.base import BuildContext, ObjectiveKind, Support
from peftkit.objectives.prepare import prepare_run_data
from peftkit.objectives.registry import (
    objective_for,
    objective_union,
    register,
    registered_objectives,
)

__all__ = [
    "BuildContext",
    "ObjectiveKind",
    "Support",
    "objective_for",
    "objective_union",
    "prepare_run_data",
    "register",
    "registered_objectives",
]
