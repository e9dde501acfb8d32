"""An exporter defined and registered outside peftkit (here, in the test) exports a trained run
through `export()`: its own `export:` section, its build step over the `ExportContext`, and the
one fidelity gate, which still measures what it wrote."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import ExportError
from peftkit.export.run import export
from peftkit.exporters import Exporter, ExportSection, registry
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import chat_rows, write_jsonl, write_recipe


class Fp32Export(ExportSection):
    """`format: fp32-test`: merged float32 weights in one shard."""

    format: Literal["fp32-test"] = "fp32-test"
    shard: str = "50GB"


class Fp32Exporter(Exporter):
    name = "fp32-test"
    spec = Fp32Export
    what = "merged float32 weights, one shard"
    merges = True

    @classmethod
    def build(cls, ctx) -> Any:
        model = ctx.merged_weights()
        ctx.write_safetensors(model, "float32", ctx.spec.shard)
        del model
        ctx.report["what"] = "fp32, one shard"
        return ctx.read_back()


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    data = write_jsonl(root / "train.jsonl", chat_rows(8))
    recipe = write_recipe(
        root / "r.yaml",
        tiny_model,
        data,
        train={"max_steps": 1, "micro_batch_size": 2, "lr": 1e-2},
        output={"dir": str(root / "run"), "plot": False},
        export={"samples": 2, "generate_tokens": 4},
    )
    r = FineTuneRun(load_recipe(recipe))
    r.setup()
    r.train()
    r.finish()
    return root / "run"


def test_a_registered_exporter_exports_through_the_gate(run, tmp_path):
    registry.register(Fp32Exporter)
    try:
        report = export(run, tmp_path / "out", format="fp32-test", log=lambda *_: None)
        with pytest.raises(ExportError, match="--dtype is an option of export format safetensors"):
            export(run, tmp_path / "x", format="fp32-test", dtype="float16", log=lambda *_: None)
    finally:
        registry.unregister("fp32-test")
    assert report["exporter"] == "fp32-test" and report["format"] == "fp32-test"
    assert report["passed"] and report["fidelity"]["samples"] > 0
    assert report["merge"] == "streamed"  # the context's merge step ran
    saved = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert saved["what"] == "fp32, one shard" and saved["passed"]
    (weights,) = (tmp_path / "out").glob("*.safetensors")  # one shard
    assert {t.dtype for t in load_file(weights).values()} == {torch.float32}
    with pytest.raises(ExportError, match="unknown export format 'fp32-test'"):
        export(run, tmp_path / "gone", format="fp32-test", log=lambda *_: None)
