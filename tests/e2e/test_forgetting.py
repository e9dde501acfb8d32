"""The forgetting report: the reference set's loss before training equals the base model's,
computed independently with plain transformers, and rises when a high learning rate on narrow
data makes the model forget; every adapter method can carry it (and multitask mixing)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from peftkit import api
from peftkit.methods import registered_methods
from tests.conftest import CORPUS, chat_rows, write_jsonl, write_recipe
from tests.e2e.test_methods import METHODS, QUANT

ROOT = Path(__file__).resolve().parents[2]


def base_text_loss(model_dir: str | Path, texts: list[str]) -> float:
    """Mean next-token loss over every token of `texts` (EOS appended, as peftkit encodes text
    rows) under the base model loaded with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            ids = ids if ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]
            ids = torch.tensor([ids])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return total / n


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reference_loss_before_is_the_base_models_and_rises_with_a_high_lr(tmp_path):
    """builtin:tiny-llama was pretrained on the reference distribution; LoRA at lr 1e-2 on the
    quickstart chats makes it forget (as recipes/tiny-llama/forgetting.yaml shows at full length)."""
    from peftkit.models.builtin import materialize

    data = ROOT / "recipes" / "data"
    texts = [json.loads(line)["text"] for line in (data / "reference-text.jsonl").open()][:16]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "builtin:tiny-llama",
        "",
        adapter={"method": "lora", "r": 16, "alpha": 16, "dropout": 0.0},
        data={
            "train": {"path": str(data / "quickstart-train.jsonl"), "limit": 96},
            "eval": {"path": str(data / "quickstart-eval.jsonl"), "limit": 16},
            "reference": str(data / "reference-text.jsonl"),
            "max_reference_rows": 16,
            "max_length": 256,
        },
        # no warm-up: every one of the 6 steps at the high lr (a warm-up's first step is at lr 0)
        train={
            "max_steps": 6,
            "eval_every": 3,
            "micro_batch_size": 16,
            "lr": 1e-2,
            "warmup_steps": 0,
        },
        output={"dir": str(tmp_path / "run"), "plot": True},
    )
    summary = api.train(recipe)
    f = summary["forgetting"]
    assert f["reference_rows"] == 16
    assert f["reference_loss_before"] == pytest.approx(
        base_text_loss(materialize("builtin:tiny-llama"), texts), rel=1e-5
    )
    assert f["reference_loss_after"] > f["reference_loss_before"] + 0.5  # forgetting shows up
    assert f["eval_loss_after"] < f["eval_loss_before"]  # ... while the task is learnt
    assert f["reference_ppl_before"] == pytest.approx(math.exp(f["reference_loss_before"]))
    assert f["reference_ppl_change_pct"] == pytest.approx(
        100 * (f["reference_ppl_after"] / f["reference_ppl_before"] - 1)
    )
    scored = [
        (r["step"], r["reference_loss"])
        for r in _records(tmp_path / "run")
        if "reference_loss" in r
    ]
    assert [s for s, _ in scored] == [0, 3, 6]
    assert scored[-1][1] == f["reference_loss_after"]
    assert (tmp_path / "run" / "loss.png").exists()
    meta = json.loads((tmp_path / "run" / "peftkit.json").read_text())
    assert [a["split"] for a in meta["data_audit"]] == ["train", "eval", "reference"]


# every registered method that trains a causal LM (the forgetting report scores one)
CAUSAL = [m for m, spec in registered_methods().items() if spec.causal_lm]


@pytest.mark.parametrize("name", CAUSAL)
def test_every_method_reports_forgetting_and_mixes_tasks(name, tmp_path, tiny_model, caplog):
    """Two tasks mixed by weight plus a reference set, without eval data or eval_every: the
    reference is still scored at step 0 (the base function, adapters fresh or switched off) and
    at the end."""
    a = write_jsonl(tmp_path / "a-train.jsonl", chat_rows(8, seed=1))
    b = write_jsonl(tmp_path / "b-train.jsonl", chat_rows(8, seed=2))
    texts = CORPUS[:8]
    reference = write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in texts])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        a,
        adapter=METHODS[name],
        model={"name": str(tiny_model), **(QUANT if name == "qlora" else {})},
        data={
            "train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}],
            "mixing": {"strategy": "weights"},
            "reference": str(reference),
            "max_length": 64,
        },
        train={"max_steps": 4, "lr": 1e-2},  # one epoch: 16 rows, 4 of a and 12 of b
    )
    caplog.set_level(logging.INFO, logger="peftkit")  # the run summary is logged
    summary = api.train(recipe)
    f = summary["forgetting"]
    if name != "qlora":  # the quantized base is not the float one
        assert f["reference_loss_before"] == pytest.approx(
            base_text_loss(tiny_model, texts), rel=1e-5
        )
    assert math.isfinite(f["reference_loss_after"]) and f["eval_loss_before"] is None
    assert [r["step"] for r in _records(tmp_path / "run") if "reference_loss" in r] == [0, 4]
    assert summary["tasks"]["b"]["drawn_rows"] == 12 and summary["tasks"]["a"]["drawn_rows"] == 4
    out = caplog.text
    assert "forgetting     reference ppl" in out and "task b" in out
