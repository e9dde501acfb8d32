"""Training options: 8-bit bases and optimizers, evaluation, early stopping, checkpoint pruning,
gradient checkpointing, the plot and the before/after samples."""

from __future__ import annotations

import json

import pytest

from peftkit import api
from peftkit.cli import main
from peftkit.errors import DataError
from tests.conftest import chat_rows, write_jsonl, write_recipe


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_on_an_8bit_base_with_an_8bit_optimizer(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        model={"name": str(tiny_model), "quantization": {"bits": 8}},
        adapter={"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
        train={"max_steps": 3, "optimizer": "adamw_8bit", "save_every": 3},
    )
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_train_loss"] < summary["first_train_loss"]
    assert (tmp_path / "run" / "checkpoints" / "step-0000003" / "optimizer.pt").exists()


def test_evaluation_best_adapter_plot_and_samples(tmp_path, tiny_model, chat_file):
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(6, seed=99))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        data={"train": str(chat_file), "eval": str(evals), "max_length": 128},
        train={"max_steps": 6, "eval_every": 2, "lr": 1e-2},
        output={
            "dir": str(tmp_path / "run"),
            "plot": True,
            "sample_prompts": ["Repeat: red fox"],
            "sample_max_new_tokens": 8,
        },
    )
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    eval_steps = [r["step"] for r in _records(run) if "eval_loss" in r]
    assert eval_steps == [0, 2, 4, 6]  # step 0: the untrained starting point
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "best" / "adapter_model.safetensors").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_eval_loss"] == min(
        r["eval_loss"] for r in _records(run) if "eval_loss" in r and r["step"] > 0
    )
    assert summary["first_eval_loss"] > summary["best_eval_loss"]
    samples = json.loads((run / "samples.json").read_text())
    assert samples[0]["prompt"] == "Repeat: red fox" and {"before", "after"} <= samples[0].keys()
    meta = json.loads((run / "peftkit.json").read_text())
    assert meta["stop_tokens"] == ["<|im_end|>"] and meta["data_audit"][1]["split"] == "eval"


def test_bf16_then_fp32_runs_in_one_process(tmp_path, tiny_model, chat_file):
    """bf16 on CPU (packed lengths rounded to 128) trains; a later fp32 run in the same process is
    not refused by accelerate's process-wide state."""
    summaries = []
    for precision in ("bf16", "fp32"):
        recipe = write_recipe(
            tmp_path / f"{precision}.yaml",
            tiny_model,
            chat_file,
            train={"max_steps": 3, "precision": precision},
            output={"dir": str(tmp_path / precision), "plot": False},
        )
        summaries.append(api.train(recipe))
    bf16, fp32 = summaries
    assert bf16["largest_micro_batch_tokens"] % 128 == 0
    assert fp32["largest_micro_batch_tokens"] % 128 != 0 or fp32["largest_micro_batch_tokens"] == 0
    assert (
        abs(bf16["final_train_loss"] - fp32["final_train_loss"]) < 0.05 * fp32["final_train_loss"]
    )
    meta = json.loads((tmp_path / "bf16" / "peftkit.json").read_text())
    assert "bf16" in json.dumps(meta)


def test_early_stopping_stops_when_eval_loss_stalls(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        data={"train": str(chat_file), "eval_fraction": 0.25, "max_length": 128},
        # Improvements must exceed 10 nats, which never happens: stop at the 2nd evaluation.
        train={
            "max_steps": 20,
            "eval_every": 1,
            "early_stopping": {"patience": 1, "min_delta": 10.0},
        },
    )
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "early stopping" and summary["steps"] == 2


def test_only_the_last_checkpoints_are_kept(tmp_path, tiny_model, chat_file):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        chat_file,
        train={"max_steps": 5, "save_every": 1, "keep_last": 2},
    )
    assert main(["train", str(recipe)]) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000005"]


def test_gradient_checkpointing_does_not_change_the_math(tmp_path, tiny_model, chat_file):
    losses = {}
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        recipe = write_recipe(
            tmp_path / f"{gc}.yaml",
            tiny_model,
            chat_file,
            train={"max_steps": 3, "gradient_checkpointing": gc, "lr": 1e-2},
            output={"dir": str(out), "plot": False},
        )
        assert main(["train", str(recipe)]) == 0
        losses[gc] = [r["loss"] for r in _records(out)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_hub_dataset_that_cannot_be_reached_is_a_clear_error(tmp_path, tiny_model, monkeypatch):
    from peftkit.data.sources import read_source
    from peftkit.recipe.schema import DataSource

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        DataError, match="could not load 'someone/no-such-dataset' as a local file or a hub dataset"
    ):
        read_source(DataSource(path="someone/no-such-dataset"))
