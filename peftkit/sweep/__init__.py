"""Hyperparameter search over a recipe with Optuna: `sweep(recipe, space, trials)`."""

from peftkit.sweep.run import SweepResult, sweep
from peftkit.sweep.space import SearchSpace, load_space

__all__ = ["SearchSpace", "SweepResult", "load_space", "sweep"]
