"""LoRA's data-aware initialisations: the adapter peftkit starts from equals the one peft's own
flow makes from the same model, config and batches (EVA: `initialize_lora_eva_weights`; CorDA:
`preprocess_corda` then `get_peft_model`), the batches are the run's first training batches, and
impossible combinations are refused by name. (Training and reloading runs with these inits are
covered by the variants of tests/e2e/test_methods.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from transformers import AutoModelForCausalLM

from peftkit.errors import RecipeError
from peftkit.launch import Launch
from peftkit.methods.base import ApplyContext
from peftkit.recipe.launch_rules import launch_problems
from peftkit.recipe.load import load_recipe
from peftkit.training.loop import FineTuneRun
from peftkit.training.method_context import first_batches
from tests.conftest import chat_rows, write_jsonl, write_recipe

TARGETS = ["q_proj", "v_proj", "up_proj"]
LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}


def _setup(tmp_path, tiny_model, **adapter):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16, seed=2))
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            tiny_model,
            data,
            adapter={**LORA, "init_batches": 2, **adapter},
            train={"max_steps": 2, "packing": False},
        )
    )
    run = FineTuneRun(recipe)
    run.setup()
    batches = first_batches(run.data.train, run.plan, run.tokenizer.pad_token_id, 2)
    return run, batches


def _weights(model, part="lora_"):
    return {
        n.replace(".default", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if part in n
    }


def test_batches_are_the_first_ones_training_sees(tmp_path, tiny_model):
    run, batches = _setup(tmp_path, tiny_model, init="eva")
    order = run.plan.epoch_order(0)
    # the same rows as the first steps' micro-batches (the loop may sort them by length)
    for step, batch in enumerate(batches):
        (first,) = run.plan.micro_batches(order, step, 0, run.objective.lengths, None)
        expected = run.objective.collate([run.data.train[i] for i in sorted(first)])
        ours = batch["input_ids"]
        assert batch.keys() >= {"input_ids", "attention_mask", "labels"}
        mine = sorted(map(tuple, ours.tolist()))
        theirs = sorted(map(tuple, expected["input_ids"].tolist()))
        assert mine == theirs, step


def test_eva_equals_peft(tmp_path, tiny_model):
    run, batches = _setup(tmp_path, tiny_model, init="eva", eva={"rho": 2.0})
    ours = run.accelerator.unwrap_model(run.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0),
        task_type="CAUSAL_LM",
    )
    theirs = get_peft_model(base, config)
    initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].alpha_pattern == theirs.peft_config["default"].alpha_pattern
    a, b = _weights(ours), _weights(theirs)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in a.items() if "lora_B" in n)
    # the vectors are kept for --resume
    assert (run.run.work / "eva-init.safetensors").exists()


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_equals_peft(tmp_path, tiny_model, mode):
    from peft.tuners.lora.config import CordaConfig

    from peftkit import _compat

    preprocess_corda = _compat.peft_corda().preprocess_corda  # (peft's; see _compat)

    run, batches = _setup(tmp_path, tiny_model, init="corda", corda={"mode": mode})
    ours = run.accelerator.unwrap_model(run.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode, verbose=False),
        task_type="CAUSAL_LM",
    )

    @torch.no_grad()
    def run_model():
        for batch in batches:  # one sample per call, as peft's CorDA example runs it
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                base(input_ids=ids[mask.bool()][None])

    preprocess_corda(base, config, run_model=run_model)
    theirs = get_peft_model(base, config)
    for part in ("lora_", "base_layer.weight"):  # CorDA also moves W0 (the residual)
        a, b = _weights(ours, part), _weights(theirs, part)
        assert a and a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=name)
    original = AutoModelForCausalLM.from_pretrained(tiny_model).model.layers[0].self_attn.q_proj
    moved = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(moved, original.weight), "CorDA left W0 unchanged"


def _raw(**adapter):
    return {
        "name": "t",
        "model": {"name": "builtin:tiny-llama"},
        "adapter": {"method": "lora", **adapter},
        "data": {"train": "x.jsonl"},
    }


@pytest.mark.parametrize(
    "adapter, message",
    [
        ({"init": "default", "loftq": {"bits": 4}}, "adapter.loftq configures init: loftq"),
        ({"init": "pissa", "eva": {}}, "adapter.eva configures init: eva"),
        ({"init": "default", "pissa_niter": 4}, "pissa_niter configures init: pissa"),
        ({"init": "eva", "use_dora": True}, "cannot start a DoRA adapter"),
    ],
)
def test_init_options_need_their_init(adapter, message):
    from peftkit.recipe.load import validate_recipe

    with pytest.raises(RecipeError, match=message):
        validate_recipe(_raw(**adapter))


def test_loftq_refuses_a_quantized_base_and_a_missing_gpu(tmp_path):
    from peftkit.recipe.load import validate_recipe

    raw = _raw(init="loftq")
    raw["model"]["quantization"] = {"bits": 4}
    with pytest.raises(RecipeError, match="LoftQ quantizes a full-precision base itself"):
        validate_recipe(raw)
    recipe = validate_recipe(_raw(init="loftq", loftq={"bits": 4, "iter": 2}))
    if importlib.util.find_spec("scipy") is None:
        with pytest.raises(RecipeError, match=r"adapter\.init loftq needs scipy"):
            recipe.adapter.peft_config(torch.nn.Linear(2, 2), _ctx(tmp_path))
    else:
        config = recipe.adapter.peft_config(torch.nn.Linear(2, 2), _ctx(tmp_path))
        assert config.init_lora_weights == "loftq"
        assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="loftq quantizes the base on a CUDA GPU"):
            recipe.adapter.apply(torch.nn.Linear(2, 2), _ctx(tmp_path))
    assert "fitted to the quantized base" in recipe.adapter.export_refusal(adapter_only=True)


def _ctx(tmp_path, **kw):
    return ApplyContext(None, "", False, False, tmp_path, **kw)


def test_pissa_niter_is_peft_s_fast_svd_name(tmp_path):
    from peftkit.recipe.load import validate_recipe

    recipe = validate_recipe(_raw(init="pissa", pissa_niter=4))
    config = recipe.adapter.peft_config(torch.nn.Linear(2, 2), _ctx(tmp_path))
    assert config.init_lora_weights == "pissa_niter_4"


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_aware_inits_need_token_rows_and_an_unsharded_model(tmp_path, init):
    from peftkit.recipe.load import validate_recipe

    recipe = validate_recipe(_raw(init=init))
    with pytest.raises(RecipeError, match=f"adapter.init {init} reads activations"):
        recipe.adapter.apply(torch.nn.Linear(2, 2), _ctx(tmp_path, batches=None))
    for kind, stage in (("deepspeed", 3), ("fsdp", None)):
        problems = launch_problems(Launch(kind=kind, processes=2, zero_stage=stage), recipe)
        assert any(f"adapter.init {init} under" in p for p in problems), problems


@pytest.mark.parametrize(
    "adapter",
    [
        {**LORA, "init": "eva"},
        {**LORA, "init": "corda"},
        {**LORA, "init": "loftq"},
        {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 3},
    ],
    ids=lambda a: a.get("init", a["method"]),
)
def test_the_planner_counts_data_aware_and_scheduled_methods(tmp_path, tiny_model, adapter):
    """The planner counts on a meta model without data or a step count: the init gives way to
    the default one (the same parameters), and AdaLoRA counts its init_r ranks."""
    from peftkit.models.load import load_tokenizer
    from peftkit.planner.counts import count

    def counted(adapter):
        recipe = load_recipe(
            write_recipe(tmp_path / "p.yaml", tiny_model, tmp_path / "x.jsonl", adapter=adapter)
        )
        return count(recipe, load_tokenizer(recipe.model)).trainable_params

    if adapter["method"] == "adalora":  # the trainable count of a real (not meta) model
        from peftkit.methods.adalora import AdaLoraSpec

        real = AdaLoraSpec(**{k: v for k, v in adapter.items() if k != "method"}).apply(
            AutoModelForCausalLM.from_pretrained(tiny_model),
            _ctx(tmp_path),
        )
        trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
        adapted = sum(1 for n, _ in real.named_modules() if n.endswith(".lora_E"))
        # on meta weights peft leaves each layer's rank counter (one scalar) trainable
        assert trainable <= counted(adapter) <= trainable + adapted
    else:
        assert counted(adapter) == counted(LORA)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_aware_adapters_export_as_llama_cpp_adapters(init, tiny_model, tmp_path):
    """EVA's per-layer ranks and scales, and CorDA's adapter converted back to the original base,
    survive `--format gguf --adapter-only`: adding the file to the base reproduces the trained
    model's logits."""
    from peftkit.cli import main
    from peftkit.export.gguf_lora import apply_lora_gguf
    from tests.e2e.test_export_gguf import PROBE, _train

    adapter = {**LORA, "target_modules": "all-linear", "init": init, "init_batches": 2}
    run, expected = _train(tmp_path, tiny_model, init, adapter)
    out = tmp_path / "gguf"
    args = ["export", str(run), "--out", str(out), "--format", "gguf", "--adapter-only"]
    assert main([*args, "--quant", "f32"]) == 0
    (written,) = out.glob("*.gguf")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        got = apply_lora_gguf(base, written).eval()(input_ids=PROBE).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
