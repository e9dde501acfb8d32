"""Rollout reuse (objective.num_iterations, steps_per_generation): the plan draws each prompt once
per generation, and the second pass over a generation, after the policy moved, is TRL 1.16's
`GRPOTrainer._compute_loss` on the same inputs: the ratio to the log-probs kept at generation time
is not 1, and the loss, the LoRA gradients and the clip counts agree."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from peftkit.data.step_plan import StepPlan
from peftkit.objectives.grpo import GRPOObjective
from peftkit.objectives.grpo_run import GRPORun as GRPO
from peftkit.objectives.rollout_buffer import Reuse, ReusePlan
from tests.unit.test_grpo_losses import TEMPERATURE, G, T, _batch, trl_setup  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore")


def test_the_plan_draws_each_prompt_once_per_generation():
    base = StepPlan(n_rows=12, micro_batch_size=2, grad_accum=2, world_size=1, seed=0)
    reuse = Reuse.of(steps_per_generation=4, num_iterations=2, grad_accum=2)  # k=2, cycle 4
    plan = ReusePlan(base, reuse)
    assert (reuse.slices, reuse.cycle) == (2, 4)
    assert plan.steps_per_epoch == 2 * 4  # 3 data steps -> 2 generations (the last wrapped on)
    order = plan.epoch_order(0)
    steps = [plan.micro_batches(order, s, 0) for s in range(plan.steps_per_epoch)]
    assert [len(s) for s in steps] == [4, 2, 2, 2] * 2  # a generation step: both slices
    for start in (0, 4):
        generation = np.concatenate(steps[start])
        slice_0, slice_1 = np.concatenate(steps[start][:2]), np.concatenate(steps[start][2:])
        for at in range(1, 4):  # each later step of the cycle trains on a slice of it
            assert np.array_equal(np.concatenate(steps[start + at]), (slice_0, slice_1)[at % 2])
        assert len(set(generation.tolist())) == 8
    first_epoch = set(np.concatenate(steps[0]).tolist()) | set(np.concatenate(steps[4]).tolist())
    assert first_epoch == set(range(12))  # every prompt of the epoch drawn
    assert Reuse.of(None, 1, 2).cycle == 1  # TRL's defaults: fresh rollouts every step


CASES = [("grpo", 0.04), ("dapo", 0.0), ("bnpo", 0.04)]


@pytest.mark.parametrize(("loss_type", "beta"), CASES, ids=[f"{a}-b{b}" for a, b in CASES])
def test_the_second_iteration_equals_trl(trl_setup, loss_type, beta):  # noqa: F811
    trainer_for, tokenizer = trl_setup
    options = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28)
    trainer = trainer_for(num_iterations=2, **options)
    model = trainer.model
    spec = GRPOObjective(
        type="grpo",
        rewards=[{"metric": "exact"}],
        num_generations=G,
        max_completion_length=T + 2,
        temperature=TEMPERATURE,
        num_iterations=2,
        **options,
    )
    grpo = GRPO(spec, [], tokenizer, [0], 0, lambda m: m, None, 8)
    plan = grpo.step_plan(StepPlan(8, 2, 1, 1, 0))
    assert isinstance(plan, ReusePlan) and grpo.reuse.cycle == 2
    grpo.before_training(model, None, 2, SimpleNamespace(distributed_type="NO"), None)
    assert grpo.prefix_problem is None  # the shared-prefix forward runs

    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = _batch(
        model.config.vocab_size
    )
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "truncated": torch.zeros(len(prompt_ids), dtype=torch.bool),
        "advantages": advantages * 3,
    }
    model.eval()  # what prepare_step keeps at generation time
    with torch.no_grad():
        batch["old_logps"] = grpo._logps(model, batch)
    if beta:
        batch["ref_logps"] = grpo._reference_logps(model, batch)
    model.train()

    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):  # the first iteration, and an update that moves the policy
        model.zero_grad()
        (grpo.loss_sum(model, batch) / grpo.units(batch)).backward()
        with torch.no_grad():
            for p in lora.values():
                p -= 2.0 * p.grad / (p.grad.norm() + 1e-12)
    grpo._loss_sums.zero_()

    items = completion_mask.sum()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": batch["advantages"],
        "old_per_token_logps": batch["old_logps"],
        "num_items_in_batch": items,
        **({"ref_per_token_logps": batch["ref_logps"]} if beta else {}),
    }
    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in lora.items()}
    model.zero_grad()
    mine = grpo.loss_sum(model, batch) / grpo.units(batch)
    mine.backward()

    with torch.no_grad():
        now = grpo._logps(model, batch)
    on = completion_mask.bool()
    assert (now - batch["old_logps"])[on].abs().max() > 0.1  # the ratio is not 1
    assert mine.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-5)
    for name, p in lora.items():
        torch.testing.assert_close(p.grad, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    _, low, high, counted, _ = grpo._loss_sums.tolist()
    logged = trainer._metrics["train"]
    assert low / counted == pytest.approx(logged["clip_ratio/low_mean"][-1], abs=1e-6)
    assert high / counted == pytest.approx(logged["clip_ratio/high_mean"][-1], abs=1e-6)
    assert low + high > 0  # the clipping is active


def test_dapo_normalises_a_slice_by_the_generations_tokens_as_trl(trl_setup):  # noqa: F811
    """steps_per_generation = 2 x grad_accum: TRL divides each slice's token sum by the whole
    generation's completion tokens x grad_accum / steps_per_generation."""
    trainer_for, tokenizer = trl_setup
    trainer = trainer_for(loss_type="dapo", beta=0.0, steps_per_generation=2)
    model = trainer.model
    spec = GRPOObjective(
        type="grpo",
        rewards=[{"metric": "exact"}],
        num_generations=G,
        max_completion_length=T + 2,
        temperature=TEMPERATURE,
        loss_type="dapo",
        steps_per_generation=2,
    )
    grpo = GRPO(spec, [], tokenizer, [0], 0, lambda m: m, None, 8)
    grpo.step_plan(StepPlan(16, 2, 1, 1, 0))
    assert (grpo.reuse.slices, grpo.reuse.cycle) == (2, 2)
    grpo.before_training(model, None, 2, SimpleNamespace(distributed_type="NO"), None)
    slices = []
    for cut in (None, 2):  # two slices with different completion tokens
        prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = _batch(
            model.config.vocab_size
        )
        if cut:
            completion_mask[:, cut:] = 0
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "truncated": torch.zeros(len(prompt_ids), dtype=torch.bool),
            "advantages": advantages,
        }
        with torch.no_grad():
            batch["old_logps"] = grpo._logps(model, batch)
        slices.append([batch])
    grpo._dapo_scales(slices, SimpleNamespace(reduce=lambda t, op: t, device=torch.device("cpu")))
    items = sum(int(s[0]["completion_mask"].sum()) for s in slices)
    for (batch,) in slices:
        theirs = trainer._compute_loss(
            model,
            {
                **{k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids")},
                "completion_mask": batch["completion_mask"],
                "advantages": batch["advantages"],
                "old_per_token_logps": batch["old_logps"],
                "num_items_in_batch": torch.tensor(items),
            },
        )
        mine = grpo.loss_sum(model, batch) / grpo.units(batch)
        assert mine.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-5)
    assert slices[0][0]["dapo_scale"] != slices[1][0]["dapo_scale"]
