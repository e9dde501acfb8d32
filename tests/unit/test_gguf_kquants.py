"""k-quants: the numpy quantizers write llama.cpp's bytes, read back (with gguf's dequantizer) within
llama.cpp's own error bounds, and `write_gguf` lays out the Q4_K_M / Q5_K_S ... mixes as
llama-quantize does."""

from __future__ import annotations

import hashlib
import shutil

import gguf
import numpy as np
import pytest
import torch

from peftkit.export.gguf import gguf_layout, named_tensors, write_gguf
from peftkit.export.gguf_arch import check_config
from peftkit.export.gguf_kquants import K_TYPES, quantize_k
from peftkit.export.gguf_mix import k_mix_type, use_more_bits
from tests.unit.test_gguf_write import make_tokenizer, relative_error

T = gguf.GGMLQuantizationType


def hashed_inputs() -> np.ndarray:
    """48 rows of 512 values built from an integer hash with exact float32 arithmetic only (no RNG,
    no libm), so every platform quantizes the same input: weight-like rows, tiny, all-positive,
    all-negative, sparse, zero, constant, outlier, integer and half-zero rows."""
    i = np.arange(48 * 512, dtype=np.uint64)
    hashed = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    u = (hashed.astype(np.float64) / 2**32).astype(np.float32)
    c = (u - np.float32(0.5)).reshape(48, 512)
    x = c * c * c * np.float32(0.4)
    x[8:16] *= np.float32(1e-3)
    x[16:20] = np.abs(x[16:20]) + np.float32(0.01)
    x[20:24] = -np.abs(x[20:24])
    x[24:28] = np.where(np.abs(c[24:28]) < np.float32(0.02), c[24:28], np.float32(0))
    x[28:30] = 0
    x[30:32] = np.float32(0.25)
    x[32:40, ::37] *= np.float32(40)
    x[40:44] = np.round(c[40:44] * np.float32(16))
    x[44:46, :256] = 0
    return x


# sha256 of llama.cpp's `quantize_row_<type>_ref` output (ggml-quants.c, ggml commit d99724f,
# built with gcc -O2 -ffp-contract=off) on `hashed_inputs()`.
LLAMA_CPP_DIGESTS = {
    T.Q6_K: "2c9921d37c63f805eefc86291c887b03436dac012c14f90292cde3f024930df8",
    T.Q5_K: "5a9925a69244f8bf75fd6eda3b06bff005cbc1f5d493a99ef6e37ef87601cba5",
    T.Q4_K: "a353a3d44f3f51d9d075f7ed99b552e6a99d00a21718a126601cf3f18c5c4b39",
    T.Q3_K: "c442212de0f4447da09ae9532d1794e20aa26a33ad29f75ddc55fe947b72c1d5",
    T.Q2_K: "ccf0b566bd11364198e140d1717bf6ab430e5b5fad7058c21bc74471525a7588",
}


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_bytes_are_llama_cpp_reference_bytes(qtype):
    x = hashed_inputs()
    packed = quantize_k(x, qtype)
    assert packed.dtype == np.uint8
    assert packed.shape == (48, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    assert hashlib.sha256(packed.tobytes()).hexdigest() == LLAMA_CPP_DIGESTS[qtype]


# llama.cpp's tests/test-quantize-fns.cpp: data 0.1 + 2 cos(i), 4096 values, error
# sqrt(sum (x - x')^2) / n, bounds 0.002 (0.004 at 3 bits, 0.0075 at 2 bits).
LLAMA_CPP_BOUNDS = {T.Q6_K: 0.002, T.Q5_K: 0.002, T.Q4_K: 0.002, T.Q3_K: 0.004, T.Q2_K: 0.0075}
# RMS error / RMS of N(0, 1) data read back, measured: Q6_K 0.0178, Q5_K 0.0363, Q4_K 0.0715,
# Q3_K 0.151, Q2_K 0.296 (q8_0 0.0054, q5_0 0.0428, q4_0 0.0862); the bounds leave 10% margin.
GAUSSIAN_BOUNDS = {T.Q6_K: 0.0196, T.Q5_K: 0.040, T.Q4_K: 0.079, T.Q3_K: 0.167, T.Q2_K: 0.326}


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_dequantized_error_within_llama_cpp_bounds(qtype):
    x = (0.1 + 2 * np.cos(np.arange(32 * 128, dtype=np.float32))).astype(np.float32)
    back = gguf.quants.dequantize(quantize_k(x, qtype), qtype)
    assert back.shape == x.shape
    error = np.sqrt(np.sum((x.astype(np.float64) - back) ** 2)) / x.size
    assert error < LLAMA_CPP_BOUNDS[qtype], error

    g = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_k(g, qtype), qtype)
    relative = np.sqrt(np.mean((g - back) ** 2) / np.mean(g**2))
    assert relative < GAUSSIAN_BOUNDS[qtype], relative


def test_zero_rows_stay_zero_and_bad_rows_are_refused():
    for qtype in K_TYPES:
        back = gguf.quants.dequantize(quantize_k(np.zeros((2, 256), np.float32), qtype), qtype)
        assert not back.any()
    with pytest.raises(ValueError, match="blocks of 256"):
        quantize_k(np.zeros((2, 640), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="not a k-quant"):
        quantize_k(np.zeros((2, 256), np.float32), T.Q8_0)


def test_mix_fallbacks_follow_the_row_size():
    """Rows that are not whole super-blocks fall back as llama.cpp's do; the head keeps Q8_0."""
    kinds = {"q4_k_m": T.Q5_0, "q5_k_s": T.Q5_1, "q6_k": T.Q8_0, "q3_k_m": T.Q4_0, "q2_k": T.Q4_0}
    for quant, fallback in kinds.items():
        assert k_mix_type(quant, "blk.1.attn_q.weight", 640, 18, 4, head=False) == fallback
        assert k_mix_type(quant, "blk.1.attn_q.weight", 100, 18, 4, head=False) == T.F16
        assert k_mix_type(quant, "token_embd.weight", 640, 18, 4, head=True) == T.Q8_0
        assert k_mix_type(quant, "output.weight", 512, 18, 4, head=True) == T.Q6_K


def _model(n_layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    return LlamaForCausalLM(config).eval()


# per mix: (attn_v / ffn_down on layers 0, 3, 6, 7 of 8 (llama.cpp's `use_more_bits` layers), the
# other layers, the base type, relative logit error bound of the read-back model). The random
# 8-layer model amplifies weight error about 5x: measured q4_k_m 0.314 (q4_0 0.365), q5_k_m 0.156
# (q5_0 0.218), q6_k 0.090 (q8_0 0.026); the bounds are 1.5x those.
MIXES = {
    "q4_k_m": (T.Q6_K, T.Q4_K, T.Q4_K, 0.47),
    "q5_k_m": (T.Q6_K, T.Q5_K, T.Q5_K, 0.23),
    "q6_k": (T.Q6_K, T.Q6_K, T.Q6_K, 0.135),
}


@pytest.mark.parametrize("quant", list(MIXES))
def test_k_mix_file_reads_back(quant, tmp_path):
    """An 8-layer Llama written as a k-quant mix: the tensor types llama-quantize would choose,
    every tensor within its type's error of the original (gguf's reader and dequantizer), and
    transformers' GGUF loader reproduces the logits."""
    from transformers import AutoModelForCausalLM

    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    more, rest, base, bound = MIXES[quant]
    tokenizer = make_tokenizer("gpt-2")
    model = _model(8, len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", quant=quant)

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == getattr(
        gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"
    )
    config, spec = model.config, check_config(model.config)
    weights = model.state_dict()
    original = {
        name: gguf_layout(name, weights[hf_name], spec, config)
        for name, hf_name in named_tensors(weights, spec, config)
    }
    assert {t.name for t in reader.tensors} == set(original)
    for tensor in reader.tensors:
        name, qtype = tensor.name, tensor.tensor_type
        if original[name].ndim == 1:
            expected = T.F32
        elif name == "output.weight":
            expected = T.Q6_K
        elif name.endswith(("attn_v.weight", "ffn_down.weight")):
            expected = more if int(name.split(".")[1]) in (0, 3, 6, 7) else rest
        else:
            expected = base
        assert qtype == expected, name
        back = gguf.quants.dequantize(tensor.data, qtype).reshape(original[name].shape)
        want = original[name]
        relative = np.linalg.norm(back - want) / np.linalg.norm(want)
        assert relative < GAUSSIAN_BOUNDS.get(qtype, 1e-6) * 1.2, (name, relative)

    reread = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    error = relative_error(model, reread.eval(), tokenizer)
    print(f"{quant}: relative logit error {error:.3g}")
    assert error < bound


def test_each_mix_is_gated_by_its_bit_width():
    from peftkit.export.gguf_export import gguf_thresholds
    from peftkit.exporters.gguf import GgufExport

    gates = {"q6_k": "q8_0", "q5_k_m": "q5", "q5_k_s": "q5", "q4_k_m": "q4", "q4_k_s": "q4"}
    gates |= {"q3_k_m": "q4", "q2_k": "q4"}
    for quant, gate in gates.items():
        spec = GgufExport(format="gguf", quant=quant)
        assert gguf_thresholds(spec) == getattr(spec, f"{gate}_thresholds"), quant


LLAMA_QUANTIZE_NAMES = {
    "q4_k_m": "Q4_K_M",
    "q4_k_s": "Q4_K_S",
    "q5_k_m": "Q5_K_M",
    "q5_k_s": "Q5_K_S",
    "q6_k": "Q6_K",
    "q3_k_m": "Q3_K_M",
    "q2_k": "Q2_K",
}


@pytest.mark.skipif(shutil.which("llama-quantize") is None, reason="llama.cpp is not installed")
def test_same_file_as_llama_quantize(tmp_path):
    """Where llama.cpp is installed: `llama-quantize` run on peftkit's f32 file gives, for every
    mix, the tensor types `write_gguf` chose and the same blocks (all of them with a build without
    fused multiply-add, which was measured; a `-march=native` build differs in a few per mille)."""
    import subprocess

    tokenizer = make_tokenizer("gpt-2")
    model = _model(8, len(tokenizer))
    source = write_gguf(model, tokenizer, tmp_path / "f32.gguf", quant="f32")
    for quant, ftype in LLAMA_QUANTIZE_NAMES.items():
        ours = write_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant=quant)
        theirs = tmp_path / f"llama-{quant}.gguf"
        subprocess.run(
            ["llama-quantize", source, theirs, ftype, "1"], check=True, capture_output=True
        )
        a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
        blocks = same = 0
        for name, tensor in a.items():
            size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
            x, y = (np.asarray(t.data).reshape(-1, size) for t in (tensor, b[name]))
            blocks += len(x)
            same += int((x == y).all(axis=1).sum())
        assert same / blocks > 0.99, (quant, same / blocks)
