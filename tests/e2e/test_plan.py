"""`peftkit plan`: its counts and its largest micro-batch are the run's own; its advice makes sense."""

from __future__ import annotations

from peftkit import api
from peftkit.cli import main
from peftkit.kernels.linear_ce import chunk_bytes
from tests.conftest import write_recipe


def test_plan_sees_the_runs_trainable_parameters_and_largest_micro_batch(
    tmp_path, tiny_model, chat_file
):
    for batching in ({}, {"packing": False}, {"micro_batch_tokens": 48}):
        recipe = write_recipe(
            tmp_path / "r.yaml", tiny_model, chat_file,
            train={"max_steps": 5, "micro_batch_size": 3, "grad_accum": 2, **batching},
            output={"dir": str(tmp_path / "run"), "plot": False, "overwrite": True},
        )  # fmt: skip
        plan = api.plan(recipe)
        summary = api.train(recipe)
        assert plan.counts.trainable_params == summary["trainable_params"]
        assert plan.counts.base_params + plan.counts.adapter_params == summary["total_params"]
        assert plan.workload.tokens == summary["largest_micro_batch_tokens"]
        assert plan.packing == (batching.get("packing", True))
        assert plan.estimate.parts["optimizer"] == 8 * summary["trainable_params"]


def test_plan_components_follow_the_recipe(tmp_path, tiny_model, chat_file):
    def plan(**sections):
        return api.plan(write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, **sections))

    lora = plan()
    checkpointed = plan(train={"gradient_checkpointing": True})
    qlora = plan(
        adapter={"method": "qlora", "r": 8},
        model={"name": str(tiny_model), "quantization": {"bits": 4}},
    )
    full = plan(adapter={"method": "full"})
    dropout = plan(adapter={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1})
    attention_only = plan(
        adapter={"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    qlora_bf16, qlora_upcast = (
        plan(
            adapter={"method": "qlora", "r": 8},
            model={"name": str(tiny_model), "quantization": {"bits": 4, "upcast_unquantized": up}},
            train={"precision": "bf16"},
        )
        for up in (False, True)
    )
    unfused = plan(train={"supervised_logits_only": False})
    answering = plan(
        data={"train": str(chat_file), "max_length": 128, "eval_fraction": 0.25},
        eval={"metric": "exact", "rows": 8, "batch_size": 3, "max_new_tokens": 16},
    )
    assert lora.workload.generation_rows == 0 and "generation" not in lora.estimate.parts
    g = answering.workload  # the evaluation's generate call is counted (its excess, if any)
    assert g.generation_rows == 3 and g.generation_tokens == g.prompt_tokens + 16 > 16
    assert "generation" in answering.estimate.parts
    assert checkpointed.estimate.parts["activations"] < lora.estimate.parts["activations"]
    # the fused MLP (dropout or not, 4-bit base too) keeps 2 of the 4 MLP-wide tensors per token
    assert lora.counts.fused_mlp and dropout.counts.fused_mlp and qlora.counts.fused_mlp
    assert not attention_only.counts.fused_mlp
    c, tokens = lora.counts, lora.workload.tokens
    fused_saving = attention_only.estimate.parts["activations"] - lora.estimate.parts["activations"]
    assert fused_saving == c.layers * tokens * 4 * 2 * c.intermediate
    assert dropout.estimate.parts["activations"] == lora.estimate.parts["activations"]
    # fp32-upcast embeddings, norms and head (peft's QLoRA preparation): 2 more bytes per
    # unquantized weight, priced; and the fused MLP does not run behind fp32 norms
    rest = c.base_params - c.quantizable_params
    upcast_cost = qlora_upcast.estimate.parts["weights"] - qlora_bf16.estimate.parts["weights"]
    assert rest > 0 and upcast_cost == rest * 2
    assert qlora_bf16.counts.fused_mlp
    assert qlora_upcast.estimate.parts["activations"] > qlora_bf16.estimate.parts["activations"]
    # the fused head keeps one chunk of logits, not every supervised position's
    assert lora.counts.fused_head
    supervised = lora.workload.supervised
    rows = min(supervised, c.fused_chunk_rows)
    assert lora.estimate.parts["logits"] == chunk_bytes(c.vocab, 4, False, rows) + (
        supervised * c.hidden * 4
    )
    assert lora.estimate.parts["backward"] < unfused.estimate.parts["backward"]
    assert qlora.estimate.parts["weights"] < lora.estimate.parts["weights"]
    assert full.counts.trainable_params == full.counts.base_params
    assert (
        full.estimate.parts["optimizer"]
        == 8 * full.counts.base_params
        > 5 * lora.estimate.parts["optimizer"]
    )


def test_plan_cli_says_what_to_change_when_it_does_not_fit(tmp_path, tiny_model, chat_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file)
    assert main(["plan", str(recipe), "--gpu-memory", "1MB"]) == 4
    out = capsys.readouterr().out
    assert "does NOT fit in" in out and "gradient_checkpointing=true" in out
    assert "train.micro_batch_tokens=" in out  # packed by default: cut micro-batches by tokens
    assert main(["plan", str(recipe), "--gpu-memory", "80GB"]) == 0
    assert "fits in 80.0 GiB of GPU" in capsys.readouterr().out
