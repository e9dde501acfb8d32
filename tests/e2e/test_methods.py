"""Every adapter method trains through the real CLI and its saved result reloads with plain peft /
transformers to the same logits as the model at the end of training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
)

from peftkit.cli import main
from peftkit.methods import MethodSpec, registered_methods
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from tests.conftest import labeled_rows, write_jsonl, write_recipe

# Every registered method is tested; a method missing here runs with its defaults. The settings
# only make the tiny runs small; the variants add LoRA options that change the math.
SETTINGS = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "qlora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "partial": {"top_layers": 1},
    "peft": {"peft_type": "hra", "config": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
    "vera": {"r": 16},
    "oft": {"block_size": 8},
    "miss": {"r": 8},
    "adalora": {"init_r": 8, "target_r": 4},
}
VARIANTS = {
    "dora": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True},
    "loraplus": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "loraplus_lr_ratio": 16},
    "peft_fourierft": {
        "method": "peft",
        "peft_type": "fourierft",
        "config": {"n_frequency": 16, "target_modules": ["q_proj", "v_proj"]},
    },
    "rslora_pissa": {
        "method": "lora",
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "use_rslora": True,
        "init": "pissa",
    },
    "pissa_niter": {
        "method": "lora",
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "init": "pissa",
        "pissa_niter": 2,
    },
    "eva": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "eva", "init_batches": 2},
    "corda": {
        "method": "lora",
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "init": "corda",
        "init_batches": 2,
    },
}
METHODS = {
    **{name: {"method": name, **SETTINGS.get(name, {})} for name in registered_methods()},
    **VARIANTS,
}
QUANT = {"quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}}


def _spec(name: str) -> type[MethodSpec]:
    return registered_methods()[METHODS[name]["method"]]


def _recipe(tmp_path, tiny_model, chat_file, name, **extra):
    model = {"name": str(tiny_model), **(QUANT if name == "qlora" else {})}
    if not _spec(name).causal_lm:  # a method that only trains a task head gets a classifier task
        chat_file = write_jsonl(tmp_path / "labeled.jsonl", labeled_rows(24, 0))
        extra = {"task": {"type": "classification"}, **extra}
    return write_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, adapter=METHODS[name], model=model, **extra
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_through_cli(name, tmp_path, tiny_model, chat_file, capsys):
    spec = _spec(name)
    recipe = _recipe(tmp_path, tiny_model, chat_file, name, train={"max_steps": 3, "lr": 1e-2})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] > 0
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    final = run / spec.final_dir_name
    weights = "model.safetensors" if spec.full_weights else "adapter_model.safetensors"
    assert (final / weights).exists()
    assert (final / "tokenizer.json").exists()
    losses = [
        r["loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    out = capsys.readouterr().out
    assert "trainable" in out and "peftkit run summary" in out


def _logits(model, ids):
    # Train mode (all dropout is 0 here) keeps bitsandbytes on the same 4-bit path as training;
    # in eval mode it may switch to a bf16 CPU inference kernel (see peftkit/_compat.py).
    model.train()
    with torch.no_grad():
        return (
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            .logits[:, -ids.shape[1] :]
            .float()
        )


@pytest.mark.parametrize("name", list(METHODS))
def test_saved_result_reloads_to_the_trained_model(name, tmp_path, tiny_model, chat_file):
    recipe = load_recipe(
        _recipe(tmp_path, tiny_model, chat_file, name, train={"max_steps": 3, "lr": 1e-2})
    )
    run = FineTuneRun(recipe)
    run.setup()
    run.train()
    run.finish()
    trained = run.accelerator.unwrap_model(run.model)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 2]])
    expected = _logits(trained, ids)
    final = run.run.final(recipe.adapter.final_dir_name)
    spec = _spec(name)
    if not spec.causal_lm:
        reloaded = AutoModelForSequenceClassification.from_pretrained(final)
    elif spec.full_weights:
        reloaded = AutoModelForCausalLM.from_pretrained(final)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert not torch.allclose(_logits(base, ids), expected), "training changed nothing"
    else:
        kwargs = {}
        if name == "qlora":
            kwargs = {
                "quantization_config": BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=torch.float32,
                    bnb_4bit_use_double_quant=True,
                ),
                "device_map": "cpu",
            }
        base = AutoModelForCausalLM.from_pretrained(tiny_model, **kwargs)
        reference = _logits(base, ids)
        reloaded = PeftModel.from_pretrained(base, final)
        assert not torch.allclose(reference, expected, atol=1e-4), "training changed nothing"
    got = _logits(reloaded, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_partial_trains_only_the_top_layer(tmp_path, tiny_model, chat_file):
    recipe = _recipe(tmp_path, tiny_model, chat_file, "partial", train={"max_steps": 2, "lr": 1e-2})
    assert main(["train", str(recipe)]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def test_lora_halves_the_loss_on_a_memorisable_set(tmp_path, tiny_model):
    from tests.conftest import chat_rows, write_jsonl

    data = write_jsonl(tmp_path / "small.jsonl", chat_rows(8, seed=3))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model,
        data,
        adapter={"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        train={"max_steps": 40, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 0},
    )
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_train_loss"] <= 0.5 * summary["first_train_loss"]


@pytest.mark.parametrize("upcast", [False, True])
def test_qlora_keeps_unquantized_layers_in_the_compute_dtype_unless_asked(
    tmp_path, tiny_model, upcast
):
    """A 4-bit base's embeddings, norms and head stay bf16 under bf16 training (peft's QLoRA
    preparation casts them to fp32: `quantization.upcast_unquantized: true` asks for that);
    nothing of the base trains either way."""
    from peftkit.methods.base import ApplyContext
    from peftkit.models.load import load_model, load_tokenizer

    recipe = load_recipe(
        write_recipe(
            tmp_path / "q.yaml",
            tiny_model,
            tmp_path / "unused.jsonl",
            adapter={"method": "qlora", "r": 4},
            model={
                "name": str(tiny_model),
                "quantization": {"bits": 4, "upcast_unquantized": upcast},
            },
        )
    )
    model = load_model(recipe.model, torch.bfloat16, torch.device("cpu"))
    ctx = ApplyContext(
        load_tokenizer(recipe.model), "", False, True, tmp_path, upcast_unquantized=upcast
    )
    model = recipe.adapter.apply(model, ctx)
    base = model.get_base_model()
    kept = [base.model.embed_tokens.weight, base.model.norm.weight, base.lm_head.weight]
    kept.append(base.model.layers[0].input_layernorm.weight)
    assert {p.dtype for p in kept} == {torch.float32 if upcast else torch.bfloat16}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name", ["loraplus", "loha", "lokr", "vera", "oft", "boft", "miss", "peft", "eva"]
)
def test_resume_equals_an_uninterrupted_run(name, tmp_path, tiny_model):
    """A crash after step 2 of 4, then --resume: the run ends bit for bit where the uninterrupted
    one ends (losses and adapter weights); LoRA+'s two learning rates included."""
    import shutil

    from safetensors.torch import load_file

    from tests.conftest import RESUME_TRAIN, chat_rows

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10, seed=1))
    train = {**RESUME_TRAIN, "max_steps": 4}

    def recipe(out):
        return write_recipe(
            tmp_path / f"{out}.yaml",
            tiny_model,
            data,
            adapter=METHODS[name],
            train=train,
            output={"dir": str(tmp_path / out), "plot": False},
        )

    assert main(["train", str(recipe("full"))]) == 0
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for lost in ("checkpoints/step-0000004", "adapter", "best"):
        shutil.rmtree(crashed / lost, ignore_errors=True)
    (crashed / "summary.json").unlink()
    assert main(["train", str(recipe("crashed")), "--resume"]) == 0

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert losses(crashed) == losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
