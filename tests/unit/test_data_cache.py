"""The data cache (Arrow, several processes, memory-mapped) gives exactly the in-memory rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from peftkit.data.cache import build
from peftkit.data.cache.key import data_key
from peftkit.data.cache.store import EncodedRows
from peftkit.data.labeled import prepare_labeled_data
from peftkit.data.pipeline import prepare_data
from peftkit.errors import DataError
from peftkit.recipe.schema import DataSpec, TaskSpec
from tests.conftest import chat_rows, write_jsonl

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
    ]
}
NO_ANSWER = {"messages": [{"role": "user", "content": "hi"}]}  # no supervised token
ROWS_BY_FORMAT = {
    "messages": [*chat_rows(30), MULTI_TURN, NO_ANSWER],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": f"ok {i}"}]}
        for i in range(20)
    ],
    "alpaca": [
        {"instruction": "Add the numbers", "input": f"{i} and 3", "output": str(i + 3)}
        for i in range(20)
    ],
    "completion": [{"prompt": f"Q: {i}?\nA:", "completion": f" {i}"} for i in range(20)],
    "chat-completion": [
        {
            "prompt": [{"role": "user", "content": f"say {i}"}],
            "completion": [{"role": "assistant", "content": str(i)}],
        }
        for i in range(20)
    ],
    "text": [{"text": "the quick brown fox " * (i % 7 + 1)} for i in range(20)],
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tokenizers_by_template):
    return AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """One file per row format, plus the other file types (read whole, not line by line)."""
    import datasets

    out = {
        name: str(write_jsonl(tmp_path / f"{name}-train.jsonl", rows))
        for name, rows in ROWS_BY_FORMAT.items()
    }
    alpaca = datasets.Dataset.from_list(ROWS_BY_FORMAT["alpaca"])
    alpaca.to_parquet(str(tmp_path / "alpaca.parquet"))
    alpaca.save_to_disk(str(tmp_path / "alpaca-saved"))
    (tmp_path / "sharegpt.json").write_text(json.dumps(ROWS_BY_FORMAT["sharegpt"]))
    for name in ("alpaca.parquet", "alpaca-saved", "sharegpt.json"):
        out[name] = str(tmp_path / name)
    return out


def assert_same(memory, cached) -> None:
    assert isinstance(cached.train, EncodedRows) and cached.cache_dir is not None
    for a, b in [(memory.train, cached.train), (memory.eval, cached.eval)]:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert type(x) is type(y)
            assert (x.origin, x.task, x.truncated) == (y.origin, y.task, y.truncated)
            np.testing.assert_array_equal(x.input_ids, y.input_ids)
            np.testing.assert_array_equal(x.labels, y.labels)
            assert x.labels.dtype == y.labels.dtype
    for a, b in [(memory.reference, cached.reference)]:
        assert [(r.origin, r.input_ids.tolist(), r.labels.tolist()) for r in a] == [
            (r.origin, r.input_ids.tolist(), r.labels.tolist()) for r in b
        ]
    assert [a.to_dict() for a in memory.audits] == [a.to_dict() for a in cached.audits]
    assert memory.stop_tokens == cached.stop_tokens
    assert memory.system_turns == cached.system_turns


@pytest.mark.parametrize(
    "settings",
    [
        # every format at once, two processes; separate eval and reference sets; truncation
        {"num_proc": 2, "max_length": 60, "system_prompt": "You are terse."},
        # a seeded hold-out of a multitask set, long rows dropped, loss on everything
        {"eval_fraction": 0.2, "max_eval_rows": 9, "truncation": "drop", "max_length": 45},
        {"loss_on": "all", "max_length": 40},
    ],
)
def test_cached_rows_equal_in_memory_rows(settings, sources, tokenizer, tmp_path, monkeypatch):
    tasks = list(sources)
    train = [{"path": sources[t], "task": t} for t in tasks]
    extra = {}
    if "eval_fraction" not in settings:
        extra["eval"] = [sources["messages"]]
        extra["reference"] = [sources["text"]]
    spec = DataSpec(train=train, **extra, **settings)
    memory = prepare_data(spec.model_copy(update={"cache": False}), tokenizer, seed=3)
    cached = prepare_data(spec, tokenizer, seed=3)
    first = memory.audits[0]  # the cases are there: truncated, dropped or unsupervised rows
    assert first.rows_truncated + first.rows_dropped_too_long + first.rows_without_supervised_tokens
    assert_same(memory, cached)
    np.testing.assert_array_equal(cached.train.tasks, [r.task for r in memory.train])
    np.testing.assert_array_equal(cached.train.lengths, [len(r.input_ids) for r in memory.train])
    # A second start maps the files: nothing is encoded again.
    monkeypatch.setattr(build, "build", lambda *a: pytest.fail("encoded twice"))
    assert_same(memory, prepare_data(spec, tokenizer, seed=3))


@pytest.mark.parametrize("task_type", ["classification", "regression"])
def test_cached_task_head_rows_equal_in_memory_rows(task_type, tokenizer, tmp_path):
    rows = [{"text": f"row {i} " * (i % 5 + 1), "label": i % 3} for i in range(40)]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    spec = DataSpec(train=[str(path)], eval_fraction=0.25, max_length=8)
    task = TaskSpec(type=task_type)
    memory, names = prepare_labeled_data(
        spec.model_copy(update={"cache": False}), task, tokenizer, 1
    )
    cached, cached_names = prepare_labeled_data(spec, task, tokenizer, 1)
    assert_same(memory, cached)
    assert names == cached_names
    again, _ = prepare_labeled_data(spec, task, tokenizer, 1)
    assert again.cache_dir == cached.cache_dir


def test_key_follows_what_changes_the_encoding(sources, tokenizer, tmp_path):
    spec = DataSpec(train=[sources["messages"]])

    def key(s=spec, template="t"):
        return data_key(s, tokenizer, template, seed=0)

    base = key()
    assert key(spec.model_copy(update={"num_proc": 2, "cache": True})) == base
    assert key(spec.model_copy(update={"max_length": 99})) != base
    assert key(spec.model_copy(update={"loss_on": "all"})) != base
    assert key(template="other") != base
    path = sources["messages"]
    with open(path, "a") as f:
        f.write(json.dumps(MULTI_TURN) + "\n")
    assert key() != base  # the file's content, not its name


def test_bad_rows_are_named_by_file_and_line_with_two_processes(tmp_path, tokenizer):
    rows = [json.dumps(r) for r in chat_rows(40)]
    rows[29] = '{"messages": [{"role": "robot", "content": "x"}]}'  # second process's half
    rows[33] = '{"messages": '  # a later bad row: the first one is named
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    spec = DataSpec(train=[str(path)], num_proc=2)
    with pytest.raises(DataError, match=r"bad\.jsonl line 30: not a valid messages row: .*robot"):
        prepare_data(spec, tokenizer, seed=0)
    rows[29] = rows[0]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 34: not valid JSON"):
        prepare_data(spec, tokenizer, seed=0)
    # Nothing half-built is left to be found by the next run.
    assert not [p for p in (tmp_path / "cache" / "data").iterdir()]


def test_batched_tokenization_equals_the_tokenizers_own_call(tokenizers_by_template):
    """The encoder calls a fast tokenizer's backend directly; ids and offsets are those of
    `tokenizer(text, return_offsets_mapping=True)`, with and without special tokens."""
    from peftkit.data.encode import Encoder

    texts = ["Q: hi\nA: hello<|im_end|>", "", "the quick brown fox " * 9, "<|im_start|>user x"]
    for name in ("chatml", "llama3"):
        tok = AutoTokenizer.from_pretrained(tokenizers_by_template[name])
        for special in (True, False):
            got = Encoder(tok, "all")._ids_and_offsets(texts, special)
            for text, row in zip(texts, got):
                enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
                assert list(row.ids) == enc["input_ids"]
                assert [tuple(o) for o in row.offsets] == [tuple(o) for o in enc["offset_mapping"]]


def test_prepare_verb_fills_the_cache_that_training_then_finds(
    tmp_path, tiny_model, monkeypatch, capsys
):
    from peftkit.cli import main
    from tests.conftest import write_recipe

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data)
    assert main(["prepare", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "train: 12 rows kept of 12 read" in out
    folder = out.strip().splitlines()[-1].removeprefix("encoded data: ")
    assert (Path(folder) / "meta.json").is_file()
    monkeypatch.setattr(build, "build", lambda *a: pytest.fail("encoded twice"))
    assert main(["prepare", str(recipe), "data.num_proc=2"]) == 0  # not part of the key
    assert main(["prepare", str(recipe), "data.cache=false"]) == 2  # nothing to prepare
