"""Bad input stops with a clear error before anything is written, and an existing run survives."""

from __future__ import annotations

import hashlib
import json

import pytest

from peftkit.cli import main
from tests.conftest import chat_rows, write_jsonl, write_recipe


def _fingerprint(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def existing_run(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "good.yaml", tiny_model, chat_file, train={"max_steps": 2, "save_every": 1}
    )
    assert main(["train", str(recipe)]) == 0
    return tmp_path / "run"


def _bad(tmp_path, tiny_model, chat_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps(chat_rows(1)[0]) + "\n{not json}\n")
    users_only = write_jsonl(
        tmp_path / "users.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4
    )
    return {
        "unknown key": (
            {"train": {"lrr": 1e-3}},
            chat_file,
            r"train\.lrr: unknown key\. Did you mean 'train\.lr'",
        ),
        "wrong type": (
            {"train": {"micro_batch_size": "four"}},
            chat_file,
            r"train\.micro_batch_size: Input should be a valid integer",
        ),
        "unknown method": (
            {"adapter": {"method": "lorra"}},
            chat_file,
            r"unknown method 'lorra'\. Did you mean 'lora'",
        ),
        "qlora unquantized": (
            {"adapter": {"method": "qlora"}},
            chat_file,
            r"'qlora' needs a quantized base",
        ),
        "fp16 on cpu": ({"train": {"precision": "fp16"}}, chat_file, r"fp16 needs a GPU"),
        "missing file": ({}, tmp_path / "missing.jsonl", r"data file not found: .*missing\.jsonl"),
        "malformed line": ({}, malformed, r"bad\.jsonl line 2: not valid JSON"),
        "empty dataset": ({}, empty, r"empty\.jsonl: the dataset is empty"),
        "no supervised tokens": ({}, users_only, r"no train row has any supervised token"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown key",
        "wrong type",
        "unknown method",
        "qlora unquantized",
        "fp16 on cpu",
        "missing file",
        "malformed line",
        "empty dataset",
        "no supervised tokens",
    ],
)
def test_bad_input_is_a_clear_error_and_the_run_directory_survives(
    case, tmp_path, tiny_model, chat_file, existing_run, capsys
):
    before = _fingerprint(existing_run)
    sections, data, message = _bad(tmp_path, tiny_model, chat_file)[case]
    sections = {**sections, "output": {"dir": str(existing_run), "overwrite": True, "plot": False}}
    recipe = write_recipe(tmp_path / "bad.yaml", tiny_model, data, **sections)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert _fingerprint(existing_run) == before


def test_existing_run_directory_is_not_overwritten_by_default(
    tmp_path, tiny_model, chat_file, existing_run, capsys
):
    before = _fingerprint(existing_run)
    recipe = write_recipe(
        tmp_path / "again.yaml", tiny_model, chat_file, output={"dir": str(existing_run)}
    )
    assert main(["train", str(recipe)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _fingerprint(existing_run) == before


def test_nan_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model, chat_file, capsys, monkeypatch
):
    from peftkit.training import loop

    real, calls = loop.causal_lm_loss_sum, []

    def diverging(model, batch, *args):  # the loss of the 4th micro-batch (step 4) becomes NaN
        calls.append(1)
        loss = real(model, batch, *args)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(loop, "causal_lm_loss_sum", diverging)
    recipe = write_recipe(
        tmp_path / "nan.yaml",
        tiny_model,
        chat_file,
        train={"max_steps": 6, "save_every": 2, "keep_last": 1},
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 4" in err and "lower train.lr" in err
    assert "last good checkpoint is" in err and "step-0000002" in err
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-0000002"] and (
        checkpoints[0] / "state.json"
    ).exists()
    assert not (tmp_path / "run" / "adapter").exists()
