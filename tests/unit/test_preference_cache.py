"""Preference data is cached as supervised data is: a second `peftkit prepare` (or run) maps the
encoded pairs from the data cache without loading the tokenizer or encoding again, and they are
the rows, audits and batches the in-memory encoding gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftkit import api
from peftkit.data import preference
from peftkit.data.cache import starts, store
from peftkit.data.spec import DataSpec
from peftkit.models.load import load_tokenizer
from peftkit.objectives.preference_run import DPOLoss, KTOLoss
from peftkit.recipe.load import load_recipe
from tests.conftest import write_jsonl, write_recipe
from tests.unit.test_cached_start import no_loading


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def _pairs(n: int) -> list[dict]:
    return [
        {
            "prompt": f"What is {i} + {i + 1}?",
            "chosen": f"{i} + {i + 1} = {2 * i + 1}." + " Yes." * (i % 3),
            "rejected": "I would rather not say.",
        }
        for i in range(n)
    ]


def _no_encoding(monkeypatch) -> None:
    no_loading(monkeypatch)
    monkeypatch.setattr(
        preference, "_prepare_in_memory", lambda *a: pytest.fail("preference rows encoded again")
    )


def _same_rows(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.origin, x.desirable) == (y.origin, y.desirable)
        assert (x.rejected is None) == (y.rejected is None)
        for s, t in zip(x.sequences, y.sequences):
            assert s.input_ids.tolist() == t.input_ids.tolist()
            assert s.labels.tolist() == t.labels.tolist()
            assert (s.origin, s.truncated, s.task) == (t.origin, t.truncated, t.task)


@pytest.mark.parametrize(("objective", "runtime"), [("dpo", DPOLoss), ("kto", KTOLoss)])
def test_a_second_prepare_maps_the_pairs_and_gives_the_same_batches(
    objective, runtime, model_dir, tmp_path, monkeypatch
):
    data = write_jsonl(tmp_path / "prefs.jsonl", _pairs(20))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model_dir,
        data,
        objective=objective,
        data={"eval_fraction": 0.2},
        train={"packing": False},
    )
    first = api.prepare(recipe)
    assert first.cache_dir is not None and Path(first.cache_dir).parent == store.data_root()

    spec = load_recipe(recipe).data
    tokenizer = load_tokenizer(load_recipe(recipe).model, needs_eos=True)
    memory = preference.prepare_preference_data(
        DataSpec(**{**spec.model_dump(), "cache": False}), tokenizer, 0, objective == "kto"
    )
    assert memory.cache_dir is None

    _no_encoding(monkeypatch)
    second = api.prepare(recipe)
    assert second.cache_dir == first.cache_dir
    for split in ("train", "eval"):
        _same_rows(getattr(memory, split), getattr(second, split))
    assert [a.to_dict() for a in second.audits] == [a.to_dict() for a in memory.audits]
    assert (second.stop_tokens, second.system_turns) == (memory.stop_tokens, memory.system_turns)

    spec = load_recipe(recipe).objective
    collate = runtime(spec, tokenizer.pad_token_id, False, lambda m: m, None).collate
    for i in range(0, len(memory.train), 4):
        a, b = collate(memory.train[i : i + 4]), collate(second.train[i : i + 4])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_trains_on_the_cached_pairs(model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "prefs.jsonl", _pairs(12))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model_dir,
        data,
        objective="dpo",
        train={"max_steps": 2, "packing": False},
        output={"overwrite": True},
    )
    api.train(recipe)
    run = tmp_path / "run"
    first = (run / "metrics.jsonl").read_text()
    assert starts.find(load_recipe(recipe)) is not None  # the run recorded its start
    # (training loads its tokenizer: only the encoding must not run again)
    monkeypatch.setattr(
        preference, "_prepare_in_memory", lambda *a: pytest.fail("preference rows encoded again")
    )
    api.train(recipe)
    losses = [
        [json.loads(line)["loss"] for line in text.splitlines() if '"loss"' in line]
        for text in (first, (run / "metrics.jsonl").read_text())
    ]
    assert losses[0] == losses[1]
