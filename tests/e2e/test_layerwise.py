"""Gradual unfreezing and layer-wise lr decay through the real loop: groups change exactly from
their stage boundary on (by steps or epochs, with and without gradient checkpointing), each param
group's lr is lr x decay^g x schedule, and a resume across a boundary equals an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.models.layer_groups import layer_groups
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import RESUME_TRAIN, chat_rows, write_jsonl, write_recipe

GROUPS = ["head", "layer 1", "layer 0", "embeddings"]  # the 2-layer tiny Llama (untied)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_with_snapshots(
    recipe_path: Path,
) -> tuple[FineTuneRun, list[dict[str, list[torch.Tensor]]]]:
    """Train; return the run and every group's weights before step 1 and after each step."""
    snapshots: list[dict[str, list[torch.Tensor]]] = []

    def snapshot(step=None, record=None):
        model = run.accelerator.unwrap_model(run.model)
        snapshots.append(
            {g.label: [p.detach().clone() for p in g.params] for g in layer_groups(model)}
        )

    run = FineTuneRun(load_recipe(recipe_path), on_step=snapshot)
    run.setup()
    snapshot()
    run.train()
    run.finish()
    return run, snapshots


def _changed_groups(before: dict, after: dict) -> set[str]:
    return {
        label
        for label in before
        if any(not torch.equal(a, b) for a, b in zip(before[label], after[label]))
    }


@pytest.mark.parametrize(
    ("unfreeze", "checkpointing"),
    [
        ({"every_steps": 2}, False),
        ({"every_epochs": 1}, True),
    ],  # 8 rows / 4 per step: 2 steps an epoch
)
def test_groups_train_exactly_from_their_stage_boundary(
    tmp_path, tiny_model, unfreeze, checkpointing
):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8, seed=2))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        data,
        adapter={"method": "full", "unfreeze": unfreeze},
        train={
            "max_steps": 7,
            "micro_batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 0,
            "gradient_checkpointing": checkpointing,
        },
    )
    run, snapshots = _train_with_snapshots(recipe)
    assert [g.label for g in run.layers.groups] == GROUPS
    for step in range(1, 8):
        trained = GROUPS[
            : min(4, 1 + (step - 1) // 2)
        ]  # head; +layer 1 after 2; +layer 0 after 4; ...
        assert _changed_groups(snapshots[step - 1], snapshots[step]) == set(trained), step
    events = {
        r["step"]: r["unfrozen_groups"]
        for r in _records(tmp_path / "run")
        if "unfrozen_groups" in r
    }
    assert events == {2: 2, 4: 3, 6: 4}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(g["label"], g["unfrozen_after_step"]) for g in summary["layer_groups"]] == list(
        zip(GROUPS, [0, 2, 4, 6])
    )
    # The whole model is counted as trainable: the peak, once every group is unfrozen.
    assert summary["trainable_params"] == summary["total_params"]


def test_partial_unfreezes_within_its_selection(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        adapter={
            "method": "partial",
            "top_layers": 1,
            "patterns": ["lm_head"],
            "unfreeze": {"every_steps": 2},
        },
        train={"max_steps": 4, "lr": 1e-2, "warmup_steps": 0},
    )
    run, snapshots = _train_with_snapshots(recipe)
    assert [g.label for g in run.layers.groups] == ["head", "layer 1"]
    assert run.layers.groups[0].names == ["lm_head.weight"]
    changed = [_changed_groups(snapshots[s - 1], snapshots[s]) for s in range(1, 5)]
    assert changed == [{"head"}, {"head"}, {"head", "layer 1"}, {"head", "layer 1"}]


def test_each_layer_group_trains_at_lr_times_decay_to_its_depth(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        adapter={"method": "full", "layer_lr_decay": 0.5},
        train={"max_steps": 6, "lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.1},
    )
    seen_at_step_3 = {}

    def read_lrs(step, record):
        if step == 3:  # warmup over, cosine part-way
            seen_at_step_3["factor"] = run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
            seen_at_step_3["groups"] = [dict(g) for g in run.optimizer.param_groups]

    run = FineTuneRun(load_recipe(recipe), on_step=read_lrs)
    run.setup()
    run.train()
    depth = {id(p): g for g, group in enumerate(run.layers.groups) for p in group.params}
    factor = seen_at_step_3["factor"]
    assert 0 < factor < 1
    seen = set()
    for group in seen_at_step_3["groups"]:
        (g,) = {depth[id(p)] for p in group["params"]}  # one layer group per param group
        seen.add(g)
        assert group["lr"] == pytest.approx(1e-2 * 0.5**g * factor, rel=1e-12)
        assert group["weight_decay"] == (0.1 if group["params"][0].ndim >= 2 else 0.0)
    assert seen == {0, 1, 2, 3}
    logged = {r["step"]: r["lr"] for r in _records(tmp_path / "run") if "lr" in r}
    assert logged[4] == pytest.approx(1e-2 * factor, rel=1e-12)  # the logged lr is group 0's


def _resumable(tmp_path: Path, tiny_model: Path, data: Path, out: str) -> Path:
    return write_recipe(
        tmp_path / f"{out}.yaml",
        tiny_model,
        data,
        adapter={"method": "full", "unfreeze": {"every_steps": 3}, "layer_lr_decay": 0.8},
        train=RESUME_TRAIN,
        output={"dir": str(tmp_path / out), "plot": False},
    )


def test_resume_across_an_unfreeze_boundary_equals_an_uninterrupted_run(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    assert main(["train", str(_resumable(tmp_path, tiny_model, data, "full"))]) == 0
    reference = _records(tmp_path / "full")
    # Crash after the checkpoint of step 4 (itself after the boundary at 3); the run resumes
    # across the next boundary at 6.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for name in ("checkpoints/step-0000006", "checkpoints/step-0000008", "model", "best"):
        shutil.rmtree(crashed / name, ignore_errors=True)
    (crashed / "summary.json").unlink()
    assert main(["train", str(_resumable(tmp_path, tiny_model, data, "crashed")), "--resume"]) == 0
    again = _records(crashed)
    steps = [(r["step"], r["loss"], r.get("unfrozen_groups")) for r in again if "loss" in r]
    assert steps == [
        (r["step"], r["loss"], r.get("unfrozen_groups")) for r in reference if "loss" in r
    ]
    assert {r["step"]: r["unfrozen_groups"] for r in again if "unfrozen_groups" in r} == {
        3: 2,
        6: 3,
    }
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(crashed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
