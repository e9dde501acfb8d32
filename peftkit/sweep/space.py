"""The search space file (SPACE.yaml): which recipe keys a sweep varies, over what ranges, scored how.

    params:
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      adapter.r: {type: categorical, choices: [8, 16, 32]}
    objective: best_eval_loss   # lower is better
    pruner: median              # or none, or {type: median, startup_trials: 3, warmup_steps: 0}
    seed: 0
    baseline: true              # trial 0 = the recipe's own values

Every key is a dotted recipe key, checked against the recipe before any trial runs.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from peftkit.errors import RecipeError, SweepError
from peftkit.recipe.load import load_recipe, read_yaml
from peftkit.recipe.schema import Recipe
from peftkit.section import Section, error_message, unknown_key_message

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.pruners import BasePruner

Scalar = bool | int | float | str | None


class FloatParam(Section):
    """A real value in [low, high]; `log` samples uniformly in log space (learning rates)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    """Discretize to low + k * step (not with log)."""

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step is not None)
        return self

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def probes(self) -> list[Scalar]:
        return [self.low, self.high]


class IntParam(Section):
    """An integer in [low, high] (ranks, batch sizes); `log` for ranges spanning magnitudes."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step != 1)
        return self

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def probes(self) -> list[Scalar]:
        return [self.low, self.high]


class CategoricalParam(Section):
    """One of a list of values (scheduler names, ranks, booleans)."""

    type: Literal["categorical"]
    choices: Annotated[list[Scalar], Field(min_length=1)]

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def probes(self) -> list[Scalar]:
        return list(self.choices)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool, stepped: bool) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"log needs low > 0 (got {low})")
    if log and stepped:
        raise ValueError("log and step do not go together: pick one")


class PrunerSpec(Section):
    """Stop trials whose eval loss is worse than the median of earlier trials at the same step."""

    type: Literal["median", "none"] = "median"
    startup_trials: int = Field(default=3, ge=0)
    """Trials that always run to the end, so the median compares against something."""
    warmup_steps: int = Field(default=0, ge=0)
    """Training steps before a trial can be pruned (early eval losses can mislead)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    def build(self) -> BasePruner:
        import optuna

        if self.type == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(
            n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_steps
        )


class SearchSpace(Section):
    """A whole SPACE.yaml, validated before any trial runs."""

    params: Annotated[dict[str, Param], Field(min_length=1)]
    """Dotted recipe key -> the range it is sampled from."""
    objective: Literal["best_eval_loss", "final_eval_loss", "final_train_loss"] = "best_eval_loss"
    """The run-summary loss a trial is scored by; lower is better."""
    pruner: PrunerSpec = PrunerSpec()
    seed: int = 0
    """Seed of the sampler: the same space and recipe give the same trials."""
    baseline: bool = True
    """Run the recipe's own values first, so the best recipe is never worse than the start."""

    @model_validator(mode="after")
    def _sweep_owns_output_dir(self) -> SearchSpace:
        if "output.dir" in self.params:
            raise ValueError("params.output.dir: the sweep sets each trial's output.dir itself")
        return self

    def distributions(self) -> dict[str, BaseDistribution]:
        return {key: param.distribution() for key, param in self.params.items()}


def load_space(path: str | Path) -> SearchSpace:
    """Parse and validate a SPACE.yaml (raises `SweepError` naming every problem)."""
    path = Path(path)
    raw = read_yaml(path, "search space", SweepError)
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise SweepError(
            f"{path}: invalid search space\n" + "\n".join(f"  - {line}" for line in lines)
        ) from None


def _describe(err: dict[str, Any]) -> str:
    # Drop the union tag pydantic puts in the location (params.train.lr.float.low -> ...lr.low).
    loc = [str(p) for p in err["loc"] if p not in ("float", "int", "categorical")]
    where = ".".join(loc)
    message = error_message(err)
    if not where:  # a rule over the whole file names its keys itself
        return message
    if err["type"] == "extra_forbidden":
        parent = err["loc"][-2] if len(err["loc"]) > 1 else None
        valid = sorted(_SECTIONS.get(str(parent), SearchSpace).model_fields)
        guess = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        return unknown_key_message(where, guess[0] if guess else None, valid)
    return f"{where}: {message}"


# Where an unknown key was found (the last location part before it) -> the valid keys there.
_SECTIONS: dict[str, type[Section]] = {
    "pruner": PrunerSpec,
    "float": FloatParam,
    "int": IntParam,
    "categorical": CategoricalParam,
}


def override(key: str, value: Scalar) -> str:
    """`key=value` with the value written as YAML, so `load_recipe` reads back the same value
    (written with str(), the string 'Answer: briefly' would read back as a mapping, 'no' as False)."""
    text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    return f"{key}={text}"


def check_space(
    space: SearchSpace, recipe_path: str | Path, overrides: list[str], source: str = "space"
) -> Recipe:
    """Check every key and range end of `space` against the recipe; return the recipe as given.

    Each probe goes through `load_recipe`, so a misspelt key gets peftkit's own error naming it
    and suggesting the right one. Combinations of values are not checked: a trial whose values do
    not go together fails alone, recorded with its message.
    """
    recipe = load_recipe(recipe_path, overrides)
    for key, param in space.params.items():
        for value in param.probes():
            try:
                load_recipe(recipe_path, [*overrides, override(key, value)])
            except RecipeError as e:
                raise SweepError(
                    f"{source}: params.{key} = {value!r} does not fit the recipe: {e}"
                ) from None
    if space.objective != "final_train_loss" and not _has_eval(recipe):
        raise SweepError(
            f"{source}: objective {space.objective} needs eval data: set data.eval or "
            "data.eval_fraction in the recipe, or use objective: final_train_loss"
        )
    if (
        space.pruner.type != "none"
        and recipe.train.eval_every is None
        and "train.eval_every" not in space.params
    ):
        raise SweepError(
            f"{source}: pruner {space.pruner.type} compares eval losses during training: set "
            "train.eval_every in the recipe (or as an override), or use pruner: none"
        )
    if space.baseline:
        _check_baseline(space, recipe, source)
    return recipe


def baseline_params(space: SearchSpace, recipe: Recipe) -> dict[str, Any]:
    """The recipe's own value of every swept key (defaults included)."""
    params = {}
    for key in space.params:
        node: Any = recipe
        for part in key.split("."):
            node = getattr(node, part)
        params[key] = node
    return params


def _check_baseline(space: SearchSpace, recipe: Recipe, source: str) -> None:
    # Optuna accepts an enqueued number outside [low, high] but not a value outside the choices.
    for key, value in baseline_params(space, recipe).items():
        param = space.params[key]
        if isinstance(param, CategoricalParam) and value not in param.choices:
            raise SweepError(
                f"{source}: baseline: the recipe's {key} = {value!r} is not among "
                f"params.{key}.choices {param.choices}: add it, or set baseline: false"
            )


def _has_eval(recipe: Recipe) -> bool:
    return bool(recipe.data.eval) or recipe.data.eval_fraction > 0
