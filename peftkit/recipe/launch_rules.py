"""What each launch (`peftkit.launch.Launch`: DDP, FSDP, DeepSpeed) refuses of a recipe, checked
before any model loads, so that a combination that cannot work is refused with its reason instead
of failing (or hanging) in the middle of training."""

from __future__ import annotations

from peftkit.errors import RecipeError
from peftkit.launch import Launch
from peftkit.recipe.schema import Recipe


def launch_problems(launch: Launch, recipe: Recipe) -> list[str]:
    """What the recipe asks for that this launch cannot do, each with what to change."""
    if not launch.shards_state:
        return []
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[launch.kind]
    problems = []
    if recipe.output.sample_prompts or recipe.eval.metric != "none":
        problems.append(
            f"output.sample_prompts / eval.metric generate text on one process, which a "
            f"{name} model (its weights split over processes) cannot do: remove them, or "
            "generate from the saved adapter afterwards (peftkit generate)"
        )
    kind = recipe.objective_kind  # what the objective declares it supports (its `support`)
    if kind.support.sharded is not None:
        problems.append(f"objective {kind.name} under {name}: {kind.support.sharded}")
    if recipe.adapter.full_weights:  # the registry's capability: its result is a whole model
        problems.append(
            f"adapter.method {recipe.adapter.method} under {name}: saving the whole sharded "
            "model is not supported yet; use an adapter method (lora, qlora, ia3, ...) or DDP"
        )
    problems += recipe.adapter.sharded_problems(name)  # what the method itself declares
    return problems


def check_launch(recipe: Recipe, launch: Launch | None = None) -> Launch:
    """The launch (default: this process's), after refusing (`RecipeError`) what it cannot run.
    Loads nothing."""
    launch = launch or Launch.from_env()
    problems = launch_problems(launch, recipe)
    if problems:
        raise RecipeError(
            f"this recipe cannot run under {launch.kind} ({launch.processes} processes):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return launch
