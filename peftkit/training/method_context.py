"""What an adapter method may read of the run when it attaches itself: the run's first training
batches (EVA and CorDA initialise from the activations they cause), added to the `ApplyContext`
once, before the method is applied."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from peftkit.data.encode import EncodedRow
from peftkit.data.mixing import step_plan
from peftkit.data.step_plan import StepPlan
from peftkit.methods.base import ApplyContext
from peftkit.objectives.batches import collate
from peftkit.recipe.schema import Recipe


def method_context(
    ctx: ApplyContext, rows: Sequence[Any], recipe: Recipe, processes: int, pad_id: int
) -> ApplyContext:
    """`ctx` with a source of the run's first training batches (token rows only: preference pairs,
    prompts and labeled rows have no single sequence to read activations from), drawn by the
    data's step plan, as the loop draws them."""
    if not (len(rows) > 0 and isinstance(rows[0], EncodedRow)):
        return dataclasses.replace(ctx, batches=None)
    t = recipe.train
    plan = step_plan(
        rows, recipe.data, t.micro_batch_size, t.grad_accum, processes, recipe.data_seed
    )
    return dataclasses.replace(ctx, batches=lambda n: first_batches(rows, plan, pad_id, n))


def first_batches(
    rows: Sequence[EncodedRow], plan: StepPlan, pad_id: int, n: int
) -> list[dict[str, torch.Tensor]]:
    """Up to `n` micro-batches of the first epoch's steps, padded (on the CPU): the rows the
    first steps train on (those of the first process; length grouping aside). Every process
    gets the same ones, so a data-aware initialisation agrees across processes."""
    order = plan.epoch_order(0)
    out: list[dict[str, torch.Tensor]] = []
    for step in range(plan.steps_per_epoch):
        for micro in plan.micro_batches(order, step, 0):
            if len(out) == n:
                return out
            out.append(collate([rows[int(i)] for i in micro], pad_id))
    return out
