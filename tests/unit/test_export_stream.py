"""The streamed merge (`export.stream`) gives the tensors peft's `merge_and_unload` gives, and the
streamed writer lays them out as `save_pretrained` does, on tiny models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from peftkit.export.gguf import write_gguf
from peftkit.export.stream import MergedWeights
from peftkit.export.write import write_model, write_streamed
from tests.conftest import CHATML, build_model, build_tokenizer

CASES = {
    "lora": ({}, {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "rslora, every linear and the embedding": (
        {},
        {"target_modules": "all-linear", "use_rslora": True, "r": 8, "lora_alpha": 4},
    ),
    "dora": ({}, {"target_modules": ["q_proj", "o_proj"], "use_dora": True}),
    "modules_to_save (untied head)": (
        {},
        {"target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    ),
    "tied embeddings, LoRA on them": (
        {"tie_word_embeddings": True},
        {"target_modules": ["embed_tokens", "q_proj"]},
    ),
    "tied head trained in full (unties)": (
        {"tie_word_embeddings": True},
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ),
}


def _adapter(base_dir, out, config: dict, seed: int = 1):
    """A LoRA adapter with random (non-zero) B, as after training, saved to `out`."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    model = get_peft_model(base, LoraConfig(**config))
    with torch.no_grad():  # modules_to_save copies start equal to the base: move them too
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out))


def _peft_merged(base_dir, adapter_dir, dtype: torch.dtype = torch.float32):
    """What export builds in memory: the base in training's dtype, upcast, then peft's merge."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).float()
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The state dict without tied copies (what save_pretrained writes)."""
    out, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = t.detach()
    return out


def _assert_same_tensors(streamed, expected: dict[str, torch.Tensor]) -> None:
    assert list(streamed) == list(expected)
    for key, want in expected.items():
        got = streamed[key]
        assert got.dtype == want.dtype and torch.equal(got, want), key


@pytest.mark.parametrize("case", CASES)
def test_streamed_lora_merge_equals_merge_and_unload(case, tmp_path):
    model_overrides, lora = CASES[case]
    build_model(tmp_path / "base", 64, **model_overrides)
    _adapter(tmp_path / "base", tmp_path / "adapter", lora)
    expected = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    streamed = MergedWeights(tmp_path / "base", tmp_path / "adapter")
    _assert_same_tensors(streamed, _unique_state(expected))
    assert streamed.config.tie_word_embeddings == expected.config.tie_word_embeddings


def test_fan_in_fan_out_layers_merge_as_peft_merges_them(tmp_path):
    """GPT-2's Conv1D stores weights transposed (peft's fan_in_fan_out): W + s·(BA)^T."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "base"))
    lora = {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
    _adapter(tmp_path / "base", tmp_path / "adapter", lora)
    expected = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    streamed = MergedWeights(tmp_path / "base", tmp_path / "adapter")
    _assert_same_tensors(streamed, _unique_state(expected))


def test_each_base_tensor_is_rounded_through_the_training_dtype(tmp_path):
    """A base trained in bf16 merges into its bf16-rounded weights, as the trained model saw."""
    build_model(tmp_path / "base", 64)
    _adapter(tmp_path / "base", tmp_path / "adapter", {"target_modules": ["q_proj"]})
    expected = _peft_merged(tmp_path / "base", tmp_path / "adapter", torch.bfloat16)
    streamed = MergedWeights(tmp_path / "base", tmp_path / "adapter", torch.bfloat16)
    _assert_same_tensors(streamed, _unique_state(expected))
    fp32 = MergedWeights(tmp_path / "base", tmp_path / "adapter")
    assert not torch.equal(
        fp32["model.layers.0.mlp.up_proj.weight"],
        expected.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (a safetensors handle)
    return out


@pytest.mark.parametrize(
    ("dtype", "shard"), [("bfloat16", "5GB"), ("float32", "100KB"), ("float16", "40KB")]
)
def test_streamed_folder_is_the_one_save_pretrained_writes(dtype, shard, tmp_path):
    build_model(tmp_path / "base", 64)
    lora = {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}
    _adapter(tmp_path / "base", tmp_path / "adapter", lora)
    old, new = tmp_path / "in-memory", tmp_path / "streamed"
    old.mkdir(), new.mkdir()
    expected = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    expected.config.use_cache = True  # as export's write_generation_config sets it
    write_model(expected, old, dtype, shard)
    written = write_streamed(
        MergedWeights(tmp_path / "base", tmp_path / "adapter"), new, dtype, shard
    )
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in new.iterdir())
    assert len(written) == (1 if shard == "5GB" else len(list(old.glob("model-*.safetensors"))))
    if shard != "5GB":
        assert len(written) > 1
        index = [json.loads((d / "model.safetensors.index.json").read_text()) for d in (old, new)]
        assert index[0] == index[1]
    for name in ("config.json", "generation_config.json"):
        assert json.loads((old / name).read_text()) == json.loads((new / name).read_text())
    got, want = _tensors(new), _tensors(old)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        new, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # strict: nothing missing, unexpected or mismatched
    before = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)
    probe = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, before(input_ids=probe).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_written_from_the_stream_is_the_file_written_from_the_model(tied, tmp_path):
    tokenizer = build_tokenizer(tmp_path / "base", CHATML)
    build_model(tmp_path / "base", len(tokenizer), tie_word_embeddings=tied)
    _adapter(tmp_path / "base", tmp_path / "adapter", {"target_modules": "all-linear"})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    from_model = write_gguf(
        _peft_merged(tmp_path / "base", tmp_path / "adapter"),
        tokenizer,
        tmp_path / "a" / "m.gguf",
        "q8_0",
    )
    streamed = MergedWeights(tmp_path / "base", tmp_path / "adapter")
    from_stream = write_gguf(streamed, tokenizer, tmp_path / "b" / "m.gguf", "q8_0")
    assert from_stream.read_bytes() == from_model.read_bytes()


def test_a_sharded_base_checkpoint_is_read_through_its_index(tmp_path):
    build_model(tmp_path / "single", 64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "single", dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="60KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    _adapter(tmp_path / "base", tmp_path / "adapter", {"target_modules": ["q_proj", "up_proj"]})
    expected = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    _assert_same_tensors(
        MergedWeights(tmp_path / "base", tmp_path / "adapter"), _unique_state(expected)
    )
