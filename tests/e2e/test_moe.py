"""MoE experts through the real loop: `adapter.target_parameters: auto` on a tiny Qwen3-MoE trains
the 3-D expert weights, the merged export equals the trained model, and a resume is exact; without
it (attention-only targets) the run warns that the experts stay frozen."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit.cli import main
from peftkit.errors import ExportError, UnsupportedGGUFExport
from peftkit.export.run import export
from tests.conftest import (
    CHATML,
    RESUME_TRAIN,
    build_tokenizer,
    chat_rows,
    write_jsonl,
    write_recipe,
)

PROBE = torch.tensor([[1, 30, 41, 52, 63, 74, 85, 2, 1, 96, 107]])
ADAPTER = {
    "method": "lora",
    "r": 4,
    "alpha": 8,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
    "target_parameters": "auto",
}


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = tmp_path_factory.mktemp("tiny-moe")
    tok = build_tokenizer(out, CHATML)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=3,
        eos_token_id=0,
        pad_token_id=7,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(out)
    return out


def _recipe(tmp_path, model, data, out, adapter, train):
    return write_recipe(
        tmp_path / f"{out}.yaml",
        model,
        data,
        adapter=adapter,
        train=train,
        output={"dir": str(tmp_path / out), "plot": False},
        export={"samples": 4, "generate_tokens": 4},
    )


def test_experts_train_merge_exactly_and_resume_exactly(tmp_path, tiny_moe, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    train = {**RESUME_TRAIN, "max_steps": 4}
    caplog.set_level(logging.WARNING, logger="peftkit")
    assert main(["train", str(_recipe(tmp_path, tiny_moe, data, "full", ADAPTER, train))]) == 0
    assert "stay frozen" not in caplog.text
    adapter = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    experts = [k for k in adapter if ".experts." in k and "lora_B" in k]
    assert experts and all(adapter[k].abs().sum() > 0 for k in experts)  # trained from B = 0

    # Merged export (fp32) == the trained model.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    trained = PeftModel.from_pretrained(base, tmp_path / "full" / "adapter").eval()
    report = export(tmp_path / "full", tmp_path / "merged", dtype="float32", log=lambda *_: None)
    assert report["passed"], report["failures"]  # the fidelity gate, on the reloaded folder
    assert report["merge"].startswith("in memory: the base checkpoint stores the MoE experts")
    assert (
        json.loads((tmp_path / "merged" / "fidelity.json").read_text())["merge"]
        == (report["merge"])
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        want, got = trained(input_ids=PROBE).logits, merged.eval()(input_ids=PROBE).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5

    # GGUF refuses the MoE architecture by name before loading; vLLM the expert LoRA.
    with pytest.raises(UnsupportedGGUFExport, match=r"llama\.cpp's 'qwen3moe'"):
        export(tmp_path / "full", tmp_path / "gguf", format="gguf", log=lambda *_: None)
    with pytest.raises(ExportError, match="trains parameters, not modules"):
        export(tmp_path / "full", tmp_path / "vllm", adapter_only=True, target="vllm")
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "vllm").exists()

    # Crash after step 2, resume: bit for bit the uninterrupted run.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for lost in ("checkpoints/step-0000004", "adapter", "best"):
        shutil.rmtree(crashed / lost, ignore_errors=True)
    (crashed / "summary.json").unlink()
    recipe = _recipe(tmp_path, tiny_moe, data, "crashed", ADAPTER, train)
    assert main(["train", str(recipe), "--resume"]) == 0

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert losses(crashed) == losses(tmp_path / "full")
    again = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert again.keys() == adapter.keys() and all(
        torch.equal(again[k], adapter[k]) for k in adapter
    )


def test_frozen_experts_are_named_in_a_warning(tmp_path, tiny_moe, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4, seed=1))
    adapter = {k: v for k, v in ADAPTER.items() if k != "target_parameters"}
    caplog.set_level(logging.WARNING, logger="peftkit")
    recipe = _recipe(tmp_path, tiny_moe, data, "run", adapter, {"max_steps": 1})
    assert main(["train", str(recipe)]) == 0
    assert "experts.down_proj, experts.gate_up_proj) stay frozen" in caplog.text
    assert "adapter.target_parameters: auto" in caplog.text


def test_plan_counts_the_expert_adapter_and_what_the_experts_keep(tmp_path, tiny_moe, caplog):
    from peftkit import api
    from peftkit.planner.estimate import moe_layer_bytes

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(6, seed=1))
    recipe = _recipe(tmp_path, tiny_moe, data, "run", ADAPTER, {"max_steps": 1})
    caplog.set_level(logging.WARNING, logger="peftkit")
    plan = api.plan(recipe)
    assert plan.counts.frozen_experts == () and "stay frozen" not in caplog.text
    summary = api.train(recipe)
    assert plan.counts.trainable_params == summary["trainable_params"]
    assert plan.counts.base_params + plan.counts.adapter_params == summary["total_params"]
    moe = plan.counts.moe
    assert moe.layers == 2 and moe.experts == 4 and moe.adapted_params == 4 * 3 * 32 * 64
    assert plan.estimate.parts["optimizer"] == 8 * summary["trainable_params"]

    frozen = {k: v for k, v in ADAPTER.items() if k != "target_parameters"}
    dense = api.plan(_recipe(tmp_path, tiny_moe, data, "frozen", frozen, {"max_steps": 1}))
    assert dense.counts.moe.adapted_params == 0
    assert dense.counts.frozen_experts == ("experts.down_proj", "experts.gate_up_proj")
    assert "experts.down_proj, experts.gate_up_proj) stay frozen" in caplog.text  # plan says so
    t, b = plan.workload.tokens, 4  # fp32 on CPU
    extra = 2 * (moe_layer_bytes(moe, 64, t, b, 4) - moe_layer_bytes(dense.counts.moe, 64, t, b, 4))
    got = plan.estimate.parts["activations"] - dense.estimate.parts["activations"]
    assert got == pytest.approx(extra)
    assert extra >= 2 * moe.adapted_params * 4  # each layer's W + s·BA copy
