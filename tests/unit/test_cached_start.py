"""A second `peftkit prepare` finds the encoded data from the tokenizer's files, without loading
the tokenizer or importing torch, and gives the rows of the first; anything that could change the
encoding (data, tokenizer files, template file) is a different start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import api
from peftkit.data.cache import build, starts, store
from peftkit.models import load
from peftkit.models.source import tokenizer_folder
from peftkit.recipe.load import load_recipe
from peftkit.recipe.schema import ModelSpec
from tests.conftest import chat_rows, write_jsonl, write_recipe
from tests.unit.test_data_cache import assert_same

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model whose tokenizer files a test may edit."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def no_loading(monkeypatch) -> None:
    monkeypatch.setattr(load, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    monkeypatch.setattr(build, "build", lambda *a: pytest.fail("encoded again"))


def test_a_second_prepare_maps_the_same_rows_without_the_tokenizer(
    model_dir, tmp_path, monkeypatch
):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(30))
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data, data={"eval_fraction": 0.2})
    first = api.prepare(recipe)
    no_loading(monkeypatch)
    second = api.prepare(recipe)
    assert_same(first, second)
    assert second.cache_dir == first.cache_dir
    assert second.chat_template == first.chat_template
    # the key covers what loading would see: the data, the tokenizer's files, the data section
    assert starts.find(load_recipe(recipe, ["data.max_length=64"])) is None
    config = model_dir / "tokenizer_config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "model_max_length": 7}))
    assert starts.find(load_recipe(recipe)) is None
    config.write_text(original)
    (model_dir / "model.safetensors").write_bytes(b"weights")  # not the tokenizer's
    assert starts.find(load_recipe(recipe)).cache_dir == first.cache_dir
    write_jsonl(data, chat_rows(31))
    assert starts.find(load_recipe(recipe)) is None


def test_a_template_file_is_part_of_the_start(model_dir, tmp_path, monkeypatch):
    from tests.conftest import CHATML

    template = tmp_path / "chat.jinja"
    template.write_text(CHATML)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    recipe = write_recipe(
        tmp_path / "r.yaml", model_dir, data, data={"chat_template": str(template)}
    )
    first = api.prepare(recipe)
    assert starts.find(load_recipe(recipe)).cache_dir == first.cache_dir
    template.write_text(CHATML.replace("<|im_end|>", "<|im_end|>\n"))
    assert starts.find(load_recipe(recipe)) is None


def test_a_pruned_folder_is_encoded_again(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data)
    first = api.prepare(recipe)
    shutil.rmtree(first.cache_dir)
    assert starts.find(load_recipe(recipe)) is None
    assert api.prepare(recipe).cache_dir == first.cache_dir


def test_task_head_data_starts_cached_too(model_dir, tmp_path, monkeypatch):
    rows = [{"text": f"row {i} " * (i % 4 + 1), "label": i % 2} for i in range(20)]
    data = write_jsonl(tmp_path / "labels.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data, task={"type": "classification"})
    first = api.prepare(recipe)
    no_loading(monkeypatch)
    assert_same(first, api.prepare(recipe))


@pytest.mark.parametrize("task", [None, {"type": "classification"}])
def test_a_prepare_after_training_starts_cached(task, model_dir, tmp_path, monkeypatch):
    """`peftkit train` records the start key of the data it encoded, as `peftkit prepare` does."""
    if task is None:
        rows, sections = chat_rows(12), {}
    else:
        rows = [{"text": f"row {i} " * (i % 4 + 1), "label": i % 2} for i in range(12)]
        sections = {"task": task}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data, **sections)
    api.train(recipe, ["train.max_steps=1"])
    no_loading(monkeypatch)
    found = starts.find(load_recipe(recipe))
    assert found is not None and Path(found.cache_dir).parent == store.data_root()
    assert api.prepare(recipe).cache_dir == found.cache_dir


def test_a_cached_prepare_imports_neither_torch_nor_transformers(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data)
    api.prepare(recipe)
    script = (
        "import sys; from peftkit.cli import main; "
        f"assert main(['prepare', {str(recipe)!r}]) == 0; "
        "heavy = ('torch', 'transformers', 'peft', 'accelerate', 'trl', 'datasets', 'pandas'); "
        "print('loaded:', [m for m in heavy if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert "train: 8 rows kept of 8 read" in done.stdout
    assert "loaded: []" in done.stdout, done.stdout


def test_hub_tokenizers_start_from_the_hub_cache_only_when_pinned(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = repo / "snapshots" / commit
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert tokenizer_folder(ModelSpec(name="org/model")) is None  # main may have moved on
    assert tokenizer_folder(ModelSpec(name="org/model", revision=commit)) == snapshot
    assert tokenizer_folder(ModelSpec(name="org/other", revision=commit)) is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert tokenizer_folder(ModelSpec(name="org/model")) == snapshot
    assert tokenizer_folder(ModelSpec(name="org/model", revision="v2")) is None
    assert tokenizer_folder(ModelSpec(name="org/model", trust_remote_code=True)) is None
