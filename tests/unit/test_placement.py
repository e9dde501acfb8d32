"""One placement rule: a model goes to its device once, at load, for training and inference alike,
and everything made from it or for it is made on that device. torch's `meta` device stands in
for a GPU (a device that is not the CPU): a model or tensor left on the CPU shows."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from peftkit.adapters.adapter_set import AdapterSet
from peftkit.models.manifest import BaseIdentity
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import chat_rows, write_jsonl, write_recipe
from tests.e2e.test_preference import pairs

META = torch.device("meta")


@pytest.fixture
def meta_identity(monkeypatch):
    """The base's identity hashes weight values, which meta tensors do not have."""
    monkeypatch.setattr(
        BaseIdentity, "of", classmethod(lambda cls, name, model, tok: cls(name, {}, "", None))
    )


def _devices(module: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in module.parameters()} | {b.device for b in module.buffers()}


def test_inference_places_a_plain_base_on_its_device(tiny_model, meta_identity):
    # serve, generate, chat, api.load_adapters and combine all hold their base in an AdapterSet
    aset = AdapterSet(str(tiny_model), dtype="float32", device="meta")
    assert _devices(aset.model) == {META}


def test_training_places_the_model_before_the_dpo_reference_is_copied(
    tiny_model, meta_identity, tmp_path, monkeypatch
):
    """DPO with `full`: the frozen reference is copied from the placed model, so it is on the
    device the batches go to (before, it stayed on the CPU while prepare moved the model)."""
    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        write_jsonl(tmp_path / "d.jsonl", pairs(8)),
        objective={"type": "dpo"},
        adapter={"method": "full"},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    run = FineTuneRun(load_recipe(recipe))
    run.setup()
    assert _devices(run.model) == {META}
    assert run.objective.frozen is not None and _devices(run.objective.frozen) == {META}


def test_pissa_runs_its_svd_on_the_models_device(tiny_model, meta_identity, tmp_path, monkeypatch):
    """PiSSA's SVD of each adapted weight runs where the model is (on a GPU, not for hours on the
    CPU before prepare moves the model). The first SVD's input is recorded, then setup stops
    (peft cannot write meta results back into the weights)."""

    class Recorded(Exception):
        pass

    def svd(a, **kwargs):
        raise Recorded(a.device)

    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))
    monkeypatch.setattr(torch.linalg, "svd", svd)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        write_jsonl(tmp_path / "d.jsonl", chat_rows(4)),
        adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "pissa"},
        output={"dir": str(tmp_path / "run"), "plot": False},
    )
    with pytest.raises(Recorded) as svd_input:
        FineTuneRun(load_recipe(recipe)).setup()
    assert svd_input.value.args == (META,)
