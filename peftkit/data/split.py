"""The eval split, one rule for every kind of data (chat rows, task-head rows, preference pairs,
prompts, and the data cache's row numbers), and the check that a split carries loss at all."""

from __future__ import annotations

import random
from typing import TypeVar

from peftkit.data.audit import SplitAudit
from peftkit.data.spec import DataSpec
from peftkit.errors import DataError

T = TypeVar("T")


def split_eval(
    train: list[T], evals: list[T], spec: DataSpec, seed: int
) -> tuple[list[T], list[T]]:
    """The eval split of every kind of data: the `data.eval` rows, or else `data.eval_fraction`
    of the train rows held out; then at most `data.max_eval_rows` of them. (The data cache applies
    the same rule to row numbers: `hold_out_indices`.)"""
    if not evals and spec.eval_fraction > 0:
        train, evals = hold_out(train, spec.eval_fraction, seed)
    if spec.max_eval_rows is not None:
        evals = evals[: spec.max_eval_rows]
    return train, evals


def hold_out(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """`data.eval_fraction` of `items` held out: (train, eval), each in the original order (the
    split of every kind of data: causal-LM examples, preference pairs, task-head rows)."""
    kept, held = hold_out_indices(len(items), fraction, seed)
    return [items[i] for i in kept], [items[i] for i in held]


def hold_out_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`data.eval_fraction`: (train, eval) row indices, each in the original order; the eval rows
    are the first of a seeded permutation."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction {fraction} leaves no training rows out of {n}")
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def check_supervised(split: str, audit: SplitAudit) -> None:
    """A split in which no row carries loss is a `DataError` saying what to change."""
    if not audit.rows_kept:
        raise DataError(
            f"no {split} row has any supervised token ({audit.rows_read} read, "
            f"{audit.rows_without_supervised_tokens} without supervised tokens, "
            f"{audit.rows_dropped_too_long} too long; e.g. {', '.join(audit.examples_without_supervision) or '-'}). "
            "Check that rows contain assistant turns or completions, raise data.max_length, "
            "or set data.loss_on: all"
        )
