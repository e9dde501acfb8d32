"""Data sources, formats, the audit, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from peftkit.data.labeled import prepare_labeled_data
from peftkit.data.pipeline import prepare_data
from peftkit.data.sources import read_source
from peftkit.errors import DataError
from peftkit.recipe.schema import DataSource, DataSpec, TaskSpec
from tests.conftest import chat_rows, labeled_rows, write_jsonl

ALPACA = {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
MESSAGES = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
}
PC = {"prompt": "Q: hi\nA:", "completion": " hello"}
TEXT = {"text": "the quick brown fox"}


@pytest.fixture
def tokenizer(tokenizers_by_template):
    return AutoTokenizer.from_pretrained(tokenizers_by_template["chatml"])


@pytest.mark.parametrize("row", [ALPACA, SHAREGPT, MESSAGES, PC, TEXT])
def test_every_format_is_detected_and_yields_supervised_tokens(row, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 3)
    data = prepare_data(DataSpec(train=[str(path)]), tokenizer, seed=0)
    assert len(data.train) == 3
    assert all(r.n_supervised > 0 for r in data.train)
    assert data.audits[0].supervised_tokens == sum(r.n_supervised for r in data.train)


def test_alpaca_and_sharegpt_become_chats(tmp_path, tokenizer):
    for row, answer in [(ALPACA, "5"), (SHAREGPT, "hello")]:
        path = write_jsonl(tmp_path / "d.jsonl", [row])
        enc = prepare_data(DataSpec(train=[str(path)]), tokenizer, seed=0).train[0]
        supervised = tokenizer.decode(
            [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
        )
        assert supervised == answer + "<|im_end|>"
        assert "<|im_start|>user" in tokenizer.decode(enc.input_ids)


def test_csv_json_parquet_and_saved_dataset_read_the_same_rows(tmp_path):
    import datasets

    rows = [PC, {"prompt": "Q: bye\nA:", "completion": " see you"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w") as f:
        f.write(
            "prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in rows)
        )
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "d.csv", "d.parquet", "saved"):
        got = [r.data for r in read_source(DataSource(path=str(tmp_path / name)))]
        assert got == rows, name


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PC) + "\n\n" + '{"prompt": "x", "completion": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not valid JSON"):
        read_source(DataSource(path=str(path)))


def test_row_of_wrong_shape_is_named(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl", [MESSAGES, {"messages": [{"role": "robot", "content": "x"}]}]
    )
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not a valid messages row: .*robot"):
        prepare_data(DataSpec(train=[str(path)]), tokenizer, seed=0)


def test_missing_file_empty_file_and_no_supervised_tokens_are_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        prepare_data(DataSpec(train=[str(tmp_path / "nope.jsonl")]), tokenizer, seed=0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        prepare_data(DataSpec(train=[str(tmp_path / "empty.jsonl")]), tokenizer, seed=0)
    users_only = write_jsonl(
        tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3
    )
    with pytest.raises(DataError, match="no train row has any supervised token"):
        prepare_data(DataSpec(train=[str(users_only)]), tokenizer, seed=0)


def test_truncation_and_drops_are_counted(tmp_path, tokenizer):
    long_answer = {"prompt": "hi", "completion": " " + "the quick brown fox " * 40}
    long_prompt = {"prompt": "the quick brown fox " * 40, "completion": " ok"}
    path = write_jsonl(tmp_path / "d.jsonl", [PC, long_answer, long_prompt])
    data = prepare_data(DataSpec(train=[str(path)], max_length=32), tokenizer, seed=0)
    audit = data.audits[0]
    assert (
        audit.rows_read,
        audit.rows_kept,
        audit.rows_truncated,
        audit.rows_without_supervised_tokens,
    ) == (3, 2, 1, 1)
    assert max(len(r.input_ids) for r in data.train) == 32
    dropped = prepare_data(
        DataSpec(train=[str(path)], max_length=32, truncation="drop"), tokenizer, seed=0
    )
    assert dropped.audits[0].rows_dropped_too_long == 2 and dropped.audits[0].rows_kept == 1


def test_eval_fraction_holds_out_rows_deterministically(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    a = prepare_data(DataSpec(train=[str(path)], eval_fraction=0.2), tokenizer, seed=1)
    b = prepare_data(DataSpec(train=[str(path)], eval_fraction=0.2), tokenizer, seed=1)
    assert (len(a.train), len(a.eval)) == (16, 4)
    assert [r.origin for r in a.eval] == [r.origin for r in b.eval]
    assert not {r.origin for r in a.eval} & {r.origin for r in a.train}


def test_a_task_head_holds_out_the_same_rows_as_a_causal_lm(tmp_path, tokenizer):
    # one split function for every kind of data: the same lines go to eval for the same seed
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30))
    labeled = write_jsonl(tmp_path / "labeled.jsonl", labeled_rows(30, 0))
    spec = {"eval_fraction": 0.2, "cache": False}
    causal = prepare_data(DataSpec(train=[str(chat)], **spec), tokenizer, seed=3)
    head, _ = prepare_labeled_data(
        DataSpec(train=[str(labeled)], **spec), TaskSpec(type="classification"), tokenizer, seed=3
    )

    def lines(rows):
        return [r.origin.rsplit(" line ", 1)[1] for r in rows]

    assert len(head.eval) == 6 and lines(head.eval) == lines(causal.eval)
    assert lines(head.train) == lines(causal.train)
