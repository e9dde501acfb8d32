"""Task heads: classification / regression on a decoder LM and a BERT-style encoder, with LoRA,
full, partial fine-tuning and a linear probe (feature extraction); metrics; export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from peftkit import api
from peftkit.errors import DataError, FidelityGateFailed, RecipeError
from tests.conftest import labeled_rows, write_jsonl, write_recipe


@pytest.fixture
def task_recipe(tmp_path, tiny_model):
    def make(
        method: dict, task: dict | None = None, model=tiny_model, steps: int = 30, word=-1, **train
    ):
        regression = (task or {}).get("type") == "regression"
        train_file = write_jsonl(tmp_path / "train.jsonl", labeled_rows(200, 0, regression, word))
        eval_file = write_jsonl(tmp_path / "eval.jsonl", labeled_rows(60, 1, regression, word))
        return write_recipe(
            tmp_path / "recipe.yaml",
            model,
            train_file,
            adapter=method,
            task=task or {"type": "classification"},
            data={"train": str(train_file), "eval": str(eval_file), "max_length": 32},
            train={
                "max_steps": steps,
                "micro_batch_size": 16,
                "lr": 1e-2,
                "eval_every": 10,
                **train,
            },
            output={"dir": str(tmp_path / "run"), "plot": False},
        )

    return make


LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


def _summary(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def _eval_records(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_loss" in r]


PARTIAL = {"method": "partial", "top_layers": 1, "patterns": ["embed_tokens"]}


@pytest.mark.parametrize(
    "method", [LORA, {"method": "full"}, PARTIAL], ids=["lora", "full", "partial"]
)
def test_classifier_learns_with_each_method(task_recipe, tmp_path, method):
    summary = api.train(task_recipe(method))
    evals = _eval_records(tmp_path)
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] < 0.85  # a random head first
    assert summary["eval_metrics"]["accuracy"] >= 0.9
    assert summary["final_eval_loss"] < 0.5 * summary["first_eval_loss"]
    matrix = summary["eval_metrics"]["confusion_matrix"]
    assert summary["eval_metrics"]["labels"] == ["animal", "other"] and sum(map(sum, matrix)) == 60
    assert summary["eval_metrics"]["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 60)


def test_lora_classifier_saves_the_trained_head_with_the_adapter(task_recipe, tmp_path):
    api.train(task_recipe(LORA))
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    heads = [k for k in weights if "score" in k]
    assert heads and any("lora_A" in k for k in weights)  # head in full + LoRA elsewhere


def test_linear_probe_trains_only_the_head(task_recipe, tmp_path, tiny_model):
    summary = api.train(task_recipe({"method": "linear_probe"}, steps=60, lr=3e-2))
    assert summary["trainable_params"] == 64 * 2  # score: hidden 64 x 2 classes, no bias
    assert summary["eval_metrics"]["accuracy"] > _eval_records(tmp_path)[0]["eval_accuracy"]
    probe = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "run" / "model"))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    trained, original = dict(probe.named_parameters()), dict(base.named_parameters())
    for name, p in original.items():
        if not name.startswith("score."):
            torch.testing.assert_close(trained[name], p, rtol=0, atol=0)  # base frozen exactly
    assert probe.config.id2label == {0: "animal", 1: "other"}


def test_regression_head_fits_a_number(task_recipe):
    summary = api.train(
        task_recipe({"method": "full"}, task={"type": "regression"}, steps=40, lr=3e-3)
    )
    metrics = summary["eval_metrics"]
    assert metrics["pearson"] > 0.9 and metrics["mse"] < 0.5


def test_encoder_model_gets_a_classifier_too(task_recipe, tmp_path, tiny_model):
    """A BERT-style encoder (first-token pooling)."""
    bert = tmp_path / "bert"
    shutil.copytree(tiny_model, bert, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(str(tiny_model))),  # its BPE tokenizer
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).bert.save_pretrained(str(bert))
    summary = api.train(task_recipe(LORA, model=bert, steps=40, word=0))
    assert summary["eval_metrics"]["accuracy"] >= 0.9


@pytest.mark.parametrize("method", [LORA, {"method": "linear_probe"}], ids=["lora", "probe"])
def test_export_of_a_classifier_reloads_and_predicts_the_same(task_recipe, tmp_path, method):
    api.train(task_recipe(method))
    report = api.export(tmp_path / "run", tmp_path / "export", dtype="float32")
    assert report["passed"] and report["fidelity"]["prediction_agreement"] == 1.0
    assert report["fidelity"]["relative_error"] < 1e-5
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export"))
    assert model.config.id2label == {0: "animal", 1: "other"}


def test_a_classifier_export_passes_the_causal_lm_fidelity_gate(task_recipe, tmp_path):
    # the same gate as a causal LM's: a missed threshold leaves nothing, unless allow_drift
    api.train(task_recipe({"method": "linear_probe"}))
    recipe_path = tmp_path / "run" / "recipe.yaml"
    strict = recipe_path.read_text().replace(
        "max_relative_error: 0.02", "max_relative_error: 1.0e-12"
    )
    recipe_path.write_text(strict)
    out = tmp_path / "export"
    with pytest.raises(FidelityGateFailed, match=r"relative error \S+ > 1e-12\. .*--allow-drift"):
        api.export(tmp_path / "run", out)  # bfloat16 weights: far over that limit
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    report = api.export(tmp_path / "run", out, allow_drift=True)
    assert report["passed"] is False and report["allow_drift"] is True
    assert json.loads((out / "fidelity.json").read_text())["failures"] == report["failures"]


def test_bad_label_names_its_file_and_line(task_recipe, tmp_path):
    recipe = task_recipe(LORA, task={"type": "classification", "labels": ["animal", "other"]})
    rows = labeled_rows(5, 0)
    rows[3]["label"] = "plant"
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl.*4.*'plant' is not one of the classes"):
        api.train(recipe)


def test_head_recipes_refuse_generation_and_probe_needs_a_head(task_recipe):
    with pytest.raises(RecipeError, match="does not generate"):
        api.validate(task_recipe(LORA), ["output.sample_prompts=[hi]"])
    with pytest.raises(RecipeError, match="linear_probe' trains a new task head"):
        api.validate(task_recipe({"method": "linear_probe"}), ["task.type=causal_lm"])
