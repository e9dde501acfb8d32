"""The objective registry: a kind of run is one module and one registration. An objective defined
here, outside peftkit, joins the recipe's `objective:` union and trains through the unchanged
loop; the registry refuses a second registration of a name or of a `type`."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch

from peftkit import api
from peftkit.errors import RecipeError
from peftkit.objectives import registry
from peftkit.objectives.base import BuildContext
from peftkit.objectives.causal_lm import CausalLM, run_batching
from peftkit.objectives.sft import SFT
from peftkit.recipe.load import load_recipe
from peftkit.recipe.reference import objectives_table
from peftkit.section import Section
from tests.conftest import chat_rows, write_jsonl, write_recipe


class ScaledSFTObjective(Section):
    """Supervised fine-tuning with the loss multiplied by `scale`."""

    type: Literal["scaled_sft"]
    scale: float = 3.0


class ScaledLoss(CausalLM):
    def __init__(self, batching, pad_id: int, scale: float) -> None:
        super().__init__(batching, pad_id)
        self.scale = scale

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * super().loss_sum(model, batch)

    def summary(self, metrics, plan, steps: int) -> dict:
        return {"scale": self.scale}


class ScaledSFT(SFT):
    """The module's one class: its section, a rule, its runtime, its summary line."""

    name = "scaled_sft"
    spec = ScaledSFTObjective
    summary_line = "Cross-entropy, scaled."

    @classmethod
    def rules(cls, recipe) -> list[str]:
        problems = super().rules(recipe)
        if recipe.objective.scale > 10:
            problems.append("objective.scale above 10 diverges: lower it")
        return problems

    @classmethod
    def build(cls, ctx: BuildContext) -> ScaledLoss:
        return ScaledLoss(run_batching(ctx), ctx.tokenizer.pad_token_id, ctx.recipe.objective.scale)

    @classmethod
    def summary_rows(cls, summary: dict) -> list[tuple[str, str]]:
        return [("scaled", f"by {summary['scale']}")]


@pytest.fixture
def scaled_sft():
    registry.register(ScaledSFT)
    yield ScaledSFT
    registry.unregister(ScaledSFT.name)


def _first_loss(run) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if "loss" in r and r.get("step") == 1)


def test_an_objective_defined_outside_peftkit_registers_and_trains(
    scaled_sft, tiny_model, tmp_path
):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    (tmp_path / "sft").mkdir()
    (tmp_path / "scaled").mkdir()
    sft = write_recipe(tmp_path / "sft" / "r.yaml", tiny_model, data, train={"max_steps": 2})
    scaled = write_recipe(
        tmp_path / "scaled" / "r.yaml",
        tiny_model,
        data,
        train={"max_steps": 2},
        objective={"type": "scaled_sft", "scale": 3.0},
    )
    recipe = load_recipe(scaled)
    assert recipe.objective_kind is ScaledSFT
    assert registry.objective_for(load_recipe(sft)) is SFT
    api.train(sft)
    summary = api.train(scaled)
    # the same rows through the same weights at step 1: the loss it logs is its own, 3x sft's
    assert _first_loss(tmp_path / "scaled" / "run") == pytest.approx(
        3 * _first_loss(tmp_path / "sft" / "run"), rel=1e-5
    )
    assert summary["objective_kind"] == "scaled_sft"
    assert "| scaled_sft | `scaled_sft` | `scale` | Cross-entropy, scaled." in objectives_table()
    with pytest.raises(RecipeError, match=r"objective\.scale above 10"):
        load_recipe(scaled, ["objective.scale=20"])


def test_the_union_forgets_an_unregistered_objective(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    path = write_recipe(tmp_path / "r.yaml", tiny_model, data, objective={"type": "scaled_sft"})
    registry.register(ScaledSFT)
    try:
        assert load_recipe(path).objective.scale == 3.0
    finally:
        registry.unregister(ScaledSFT.name)
    with pytest.raises(RecipeError, match="scaled_sft"):
        load_recipe(path)


def test_the_registry_refuses_a_second_registration():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(SFT)

    class OtherSection(Section):
        type: Literal["dpo"]

    class OtherDPO(SFT):
        name = "other_dpo"
        spec = OtherSection

    with pytest.raises(ValueError, match="type 'dpo' has two sections"):
        registry.register(OtherDPO)
    assert "other_dpo" not in registry.registered_objectives()


def test_every_builtin_objective_declares_itself():
    kinds = registry.registered_objectives()
    assert list(kinds) == [
        "sft",
        "multitask",
        "task_head",
        "dpo",
        "orpo",
        "kto",
        "simpo",
        "grpo",
    ]
    table = objectives_table()
    for name, kind in kinds.items():
        assert kind.summary_line and kind.spec.__doc__, name
        assert f"| {name} | `{registry.spec_type(kind.spec)}` |" in table
