"""GGUF files as base models: tiny Llama and Qwen2 models written to GGUF (peftkit's writer) are
fine-tuned from `model.name: x.gguf` or `model.gguf_file`; the dequantized base is materialised
once per file content, and is exactly what transformers' own GGUF reader returns."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit import api
from peftkit.caches import gguf_cache
from peftkit.errors import ModelLoadError, RecipeError
from peftkit.export.gguf import write_gguf
from peftkit.models import gguf
from peftkit.models.load import resolve_source
from peftkit.recipe.load import validate_recipe
from tests.conftest import chat_rows, write_jsonl
from tests.unit.test_gguf_write import make_model, make_tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


def _gguf(tmp_path, kind: str, quant: str = "q8_0"):
    tokenizer = make_tokenizer("gpt-2", add_bos=False)
    model = make_model(kind, len(tokenizer), tied=kind == "qwen2")
    (tmp_path / "files").mkdir(parents=True, exist_ok=True)
    path = write_gguf(model, tokenizer, tmp_path / "files" / f"tiny-{kind}.gguf", quant=quant)
    return path, tokenizer


def _train(tmp_path, model: dict, steps: int = 3) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, seed=7))
    recipe = validate_recipe(
        {
            "model": model,
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(data), "eval": str(evals), "max_length": 96},
            "train": {"max_steps": steps, "micro_batch_size": 4, "lr": 1e-2, "eval_every": steps},
            "output": {"dir": str(tmp_path / "run"), "plot": False, "overwrite": True},
        }
    )
    return api.train(recipe)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_gguf_file_is_a_base_model(tmp_path, kind):
    path, _ = _gguf(tmp_path, kind)
    summary = _train(tmp_path, {"name": str(path)})
    assert summary["steps"] == 3 and summary["final_eval_loss"] < summary["first_eval_loss"]
    folder = resolve_source(str(path))
    # the base is what transformers' own reader dequantizes from the file, bit for bit
    reader = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    saved = load_file(f"{folder}/model.safetensors")
    for name, p in reader.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], p), name
    assert len(saved) >= len(dict(reader.named_parameters())) - 1  # tied heads are saved once
    manifest = json.loads((tmp_path / "run" / "adapter" / "peftkit_adapter.json").read_text())
    assert manifest["base_model"]["gguf"]["sha256"] == gguf.file_sha256(path)
    assert manifest["base_model"]["gguf"]["tensor_types"]["Q8_0"] > 0


def test_materialised_once_per_content_and_rebuilt_when_the_file_changes(tmp_path):
    path, _ = _gguf(tmp_path, "llama")
    t = time.perf_counter()
    first = resolve_source(str(path))
    built = time.perf_counter() - t
    t = time.perf_counter()
    assert resolve_source(str(path)) == first  # from the cache
    assert time.perf_counter() - t < max(built / 4, 0.5)
    copy = tmp_path / "elsewhere" / "same.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert resolve_source(str(copy)) == first.replace(path.stem, "same")  # same content key
    other, _ = _gguf(tmp_path / "b", "llama", quant="f16")
    assert gguf.file_sha256(other) != gguf.file_sha256(path)
    assert resolve_source(str(other)) != first
    assert not list(gguf_cache().glob("*.tmp-*"))


def test_gguf_file_inside_a_folder(tmp_path):
    path, _ = _gguf(tmp_path, "llama")
    assert resolve_source(str(path.parent), gguf_file=path.name) == resolve_source(str(path))
    with pytest.raises(ModelLoadError, match=r"is not in .*GGUF files there: tiny-llama\.gguf"):
        resolve_source(str(path.parent), gguf_file="other.gguf")
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))


def test_unreadable_or_unsupported_files_get_named_errors(tmp_path):
    import gguf as gguf_py

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=r"junk\.gguf is not a readable GGUF file"):
        resolve_source(str(junk))
    odd = tmp_path / "odd.gguf"
    writer = gguf_py.GGUFWriter(str(odd), "rwkv7")
    writer.add_tensor("x", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"architecture 'rwkv7' cannot be read"):
        resolve_source(str(odd))
    assert not list(gguf_cache().glob("odd-*"))  # nothing half-built is kept


def test_gguf_file_rules_in_the_recipe():
    base = {"adapter": {"method": "lora"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(RecipeError, match=r"already a \.gguf file"):
        validate_recipe({**base, "model": {"name": "m.gguf", "gguf_file": "x.gguf"}})
    with pytest.raises(RecipeError, match=r"must name a \.gguf file"):
        validate_recipe({**base, "model": {"name": "org/repo", "gguf_file": "x.bin"}})
