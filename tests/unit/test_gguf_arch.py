"""write_gguf beyond Llama: Qwen3, Phi-3, Gemma 2 and Gemma 3 (tiny random configs) and the 4/5-bit
quants, read back with transformers' GGUF loader (independent of peftkit) and with `gguf`'s reader,
and compared with the HF model; plus refusals that need no weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from peftkit.errors import UnsupportedGGUFExport
from peftkit.export.gguf import write_gguf
from peftkit.export.gguf_arch import check_config
from tests.conftest import CHATML, CORPUS, SPECIALS
from tests.unit.test_gguf_write import TEXTS, make_model, make_tokenizer, relative_error

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def sentencepiece_tokenizer(shape: str):
    """A byte-fallback BPE trained on the test corpus, shaped as transformers builds Gemma's
    ("gemma": no space prefix) or Phi-3's ("phi3": a "\u2581" prefix from the normalizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Replace(" ", "\u2581")
    raw.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=GEMMA_SPECIALS + SPECIALS + byte_pieces
    )
    raw.train_from_iterator(CORPUS + [t for t in TEXTS if "<|" not in t], trainer)
    vocab = raw.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(raw)]
    if shape == "gemma":
        tok = GemmaTokenizer(vocab=vocab, merges=merges)
    else:
        tok = LlamaTokenizer(
            vocab=vocab, merges=merges, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
        )
        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        tok.backend_tokenizer.pre_tokenizer = None
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.pad_token = "<pad>"
    tok.chat_template = CHATML
    return tok


def _merges(raw) -> list:
    import json

    return json.loads(raw.to_str())["model"]["merges"]


def make_arch_model(kind: str, vocab_size: int):
    import transformers as t

    torch.manual_seed(0)
    shape = dict(SHAPE, vocab_size=vocab_size)
    if kind == "qwen3":  # q/k norms; head_dim 128 != 64 / 4 heads (transformers 5.25's GGUF
        # reader ignores Qwen3's key_length and takes its default head_dim, 128)
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**shape, head_dim=128, tie_word_embeddings=True))
    elif kind == "phi3":  # fused qkv_proj and gate_up_proj
        model = t.Phi3ForCausalLM(t.Phi3Config(**shape, tie_word_embeddings=False, pad_token_id=0))
    elif kind == "gemma2":  # soft-capping, post-norms; 256 = transformers' default head_dim
        model = t.Gemma2ForCausalLM(t.Gemma2Config(**shape, head_dim=256))
    else:  # gemma3: q/k norms, a local and a global RoPE base
        model = t.Gemma3ForCausalLM(t.Gemma3TextConfig(**shape, head_dim=256))
    with torch.no_grad():  # norms away from their neutral value, so an offset or a swap would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if kind.startswith("gemma") else p.uniform_(0.5, 1.5)
    return model.eval()


# arch -> (transformers class read back, tokenizer)
ARCHS = {
    "qwen3": ("Qwen3ForCausalLM", lambda: make_tokenizer("qwen2")),
    "phi3": ("Phi3ForCausalLM", lambda: sentencepiece_tokenizer("phi3")),
    "gemma2": ("Gemma2ForCausalLM", lambda: sentencepiece_tokenizer("gemma")),
    "gemma3": ("Gemma3ForCausalLM", lambda: sentencepiece_tokenizer("gemma")),
}
# f32 is exact; q8_0 bounds as in test_gguf_write (measured 1.0e-2 .. 2.4e-2 here).
BOUNDS = {"f32": 1e-5, "q8_0": 5e-2}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_case(request):
    tokenizer = ARCHS[request.param][1]()
    return request.param, make_arch_model(request.param, len(tokenizer)), tokenizer


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_architecture_round_trip(arch_case, quant, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, model, tokenizer = arch_case
    path = write_gguf(model, tokenizer, tmp_path / f"{kind}.gguf", quant=quant)
    reread = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    assert type(reread).__name__ == ARCHS[kind][0]
    error = relative_error(model, reread.eval(), tokenizer)
    print(f"{kind} {quant}: relative logit error {error:.3g}")
    assert error <= BOUNDS[quant]

    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + CORPUS:
        for special in (False, True):
            assert tok.encode(text, add_special_tokens=special) == tokenizer.encode(
                text, add_special_tokens=special
            ), text
    assert tok.chat_template == CHATML


def _reader_tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
        list(reversed(t.shape.tolist()))
    )


def test_gemma_metadata_and_norm_offset(tmp_path):
    """llama.cpp's keys for Gemma 2 / 3, and norms stored as w + 1 (read with gguf's reader)."""
    tokenizer = sentencepiece_tokenizer("gemma")
    for kind in ("gemma2", "gemma3"):
        model = make_arch_model(kind, len(tokenizer))
        path = write_gguf(model, tokenizer, tmp_path / f"{kind}.gguf", quant="f32")
        reader = gguf.GGUFReader(path)
        fields = {
            k: f.contents()
            for k, f in reader.fields.items()
            if not k.startswith(("tokenizer.ggml.t", "tokenizer.ggml.s", "tokenizer.ggml.m"))
        }
        assert fields["general.architecture"] == kind
        assert fields[f"{kind}.attention.key_length"] == 256
        assert fields[f"{kind}.attention.sliding_window"] == model.config.sliding_window
        hf = model.state_dict()
        for hf_name, gguf_name in [
            ("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight"),
            ("model.norm.weight", "output_norm.weight"),
        ]:
            np.testing.assert_array_equal(
                _reader_tensor(reader, gguf_name), hf[hf_name].numpy() + 1.0
            )
        if kind == "gemma2":
            assert fields["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
            assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
        else:
            assert fields["gemma3.rope.freq_base"] == pytest.approx(1e6)
            assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
            np.testing.assert_array_equal(
                _reader_tensor(reader, "blk.0.attn_q_norm.weight"),
                hf["model.layers.0.self_attn.q_norm.weight"].numpy() + 1.0,
            )
        assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
        assert fields["tokenizer.ggml.add_space_prefix"] is False
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
        assert types[tokenizer.convert_tokens_to_ids("<eos>")] == gguf.TokenType.CONTROL


def test_phi3_keeps_the_fused_projections(tmp_path):
    tokenizer = sentencepiece_tokenizer("phi3")
    model = make_arch_model("phi3", len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path / "p.gguf", quant="f32")
    reader = gguf.GGUFReader(path)
    layer = model.model.layers[0]
    np.testing.assert_array_equal(
        _reader_tensor(reader, "blk.0.attn_qkv.weight"), layer.self_attn.qkv_proj.weight.detach()
    )
    np.testing.assert_array_equal(
        _reader_tensor(reader, "blk.0.ffn_up.weight"), layer.mlp.gate_up_proj.weight.detach()
    )
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True


# Relative logit error of the read-back tiny random Llama (64 wide, weights N(0, 0.1): far from
# trained weights): measured q5_1 0.132, q5_0 0.165, q4_1 0.252, q4_0 0.269; ~1.5x margin.
LOW_BIT_BOUNDS = {"q5_1": 0.2, "q5_0": 0.25, "q4_1": 0.4, "q4_0": 0.4}


def test_low_bit_quants_round_trip_and_order(tmp_path):
    """q5_1 / q5_0 / q4_1 / q4_0: read back by transformers within their bounds, each coarser quant
    at least as far off as the finer one, the head kept at q8_0."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer("gpt-2")
    model = make_model("llama", len(tokenizer), tied=False)
    errors = {}
    for quant in LOW_BIT_BOUNDS:
        path = write_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant=quant)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_q.weight"] == quant.upper()
        assert types["output.weight"] == "Q8_0"
        reread = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32
        )
        errors[quant] = relative_error(model, reread.eval(), tokenizer)
    print("relative logit errors:", {k: f"{v:.3g}" for k, v in errors.items()})
    for quant, bound in LOW_BIT_BOUNDS.items():
        assert errors[quant] <= bound, quant
    assert errors["q5_1"] < errors["q4_1"] and errors["q5_0"] < errors["q4_0"]


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("gemma3_text", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
        ("gemma3_text", {"final_logit_softcapping": 30.0}, "soft-cap"),
        ("gemma3_text", {"layer_types": ["full_attention", "full_attention"]}, "layer_types"),
        ("gemma2", {"final_logit_softcapping": None}, "soft-caps"),
        ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ("gpt2", {}, "gpt2"),
    ],
)
def test_configs_llama_cpp_cannot_run_are_refused_from_the_config_alone(kind, change, message):
    from transformers import AutoConfig

    config = AutoConfig.for_model(kind, **({} if kind == "gpt2" else SHAPE), **change)
    with pytest.raises(UnsupportedGGUFExport, match=message):
        check_config(config)
