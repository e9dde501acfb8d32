"""The lr schedules equal transformers' (what the Trainer and TRL use), warmup included: step k of
the warmup runs at lr x k / warmup, so the first step at lr 0."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from peftkit.recipe.schema import TrainSpec
from peftkit.training.optim import build_scheduler

TOTAL = 12
THEIRS = {
    "cosine": lambda opt, w: get_cosine_schedule_with_warmup(opt, w, TOTAL),
    "linear": lambda opt, w: get_linear_schedule_with_warmup(opt, w, TOTAL),
    "constant": lambda opt, w: get_constant_schedule_with_warmup(opt, w),
}


def _lrs(scheduler) -> list[float]:
    out = []
    for _ in range(TOTAL):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup", [0, 1, 2, 5])
@pytest.mark.parametrize("kind", list(THEIRS))
def test_schedules_equal_transformers(kind, warmup):
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    spec = TrainSpec(lr=1e-3, scheduler=kind, warmup_steps=warmup)
    ours = _lrs(build_scheduler(spec, optimizer(), TOTAL))
    assert ours == pytest.approx(_lrs(THEIRS[kind](optimizer(), warmup)), abs=1e-15)
    if warmup:
        assert ours[0] == 0.0 and ours[warmup] == pytest.approx(1e-3)
