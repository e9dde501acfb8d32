"""Write a transformers causal LM and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio).

The file is written with the `gguf` package, the library llama.cpp's own converter uses, and laid
out the way that converter lays it out, so llama.cpp and transformers' GGUF loader both read it:

- tensor names from `gguf.get_tensor_name_map` (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`);
- per-architecture layout and hyperparameters from `gguf_arch` (Llama q/k permutation, Gemma's
  `w + 1` norms, Phi-3's fused projections);
- weights rounded by `gguf.quants.quantize` (f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0); 1-D
  tensors (norms, biases) stay f32, and a 2-D tensor whose rows do not split into whole blocks of
  32 falls back to f16, as llama.cpp does. With a 4- or 5-bit quant the output head (the embedding
  when tied) is written as q8_0: llama.cpp's quantizer keeps it at 6 bits, which `gguf` cannot
  write;
- no `output.weight` when the head is tied to the embedding (readers infer the tie from its absence).

Supported: see `gguf_arch.ARCHITECTURES` (Llama incl. SmolLM2, Mistral, Qwen2, Qwen3, Phi-3,
Gemma 2, Gemma 3), with plain RoPE.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from peftkit._compat import readable_gguf_name
from peftkit.errors import UnsupportedGGUFExport
from peftkit.export.gguf_arch import ArchSpec, add_hyperparameters, check_config
from peftkit.export.gguf_vocab import build_vocab

_T, _F = gguf.GGMLQuantizationType, gguf.LlamaFileType
# peftkit name -> (GGML type of 2-D weights, llama.cpp's file type)
QUANTS = {
    "f32": (_T.F32, _F.ALL_F32),
    "f16": (_T.F16, _F.MOSTLY_F16),
    "bf16": (_T.BF16, _F.MOSTLY_BF16),
    "q8_0": (_T.Q8_0, _F.MOSTLY_Q8_0),
    "q5_1": (_T.Q5_1, _F.MOSTLY_Q5_1),
    "q5_0": (_T.Q5_0, _F.MOSTLY_Q5_0),
    "q4_1": (_T.Q4_1, _F.MOSTLY_Q4_1),
    "q4_0": (_T.Q4_0, _F.MOSTLY_Q4_0),
}
LOW_BIT = (_T.Q5_1, _T.Q5_0, _T.Q4_1, _T.Q4_0)  # the head stays q8_0 with these


def write_gguf(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    quant: str = "f16",
    chat_template: str | None = None,
    stop_tokens: Sequence[str] | None = None,
) -> Path:
    """Write `model` and `tokenizer` to the GGUF file `path`, atomically.

    Args:
        model: a causal LM of an architecture in `gguf_arch.ARCHITECTURES` (any dtype; merged,
            without adapters), or a `stream.MergedWeights` (read one tensor at a time).
        tokenizer: its transformers tokenizer (byte-level BPE, or sentencepiece-style BPE).
        path: the file to write; its folder must exist. An existing file is replaced.
        quant: one of `QUANTS` for the 2-D weights; 1-D tensors stay f32.
        chat_template: the Jinja chat template to embed; None keeps the tokenizer's own.
        stop_tokens: token strings generation should stop at; the first that is not EOS is
            written as `tokenizer.ggml.eot_token_id` (llama.cpp ends generation there).

    Returns:
        The path written.

    Raises:
        UnsupportedGGUFExport: an architecture, RoPE variant or tokenizer that GGUF (or this writer)
            cannot represent, or an unknown `quant`. Raised before anything is written.
    """
    path = Path(path)
    check_quant(quant)
    if hasattr(model, "peft_config"):
        raise UnsupportedGGUFExport("GGUF holds plain weights: merge the adapter first")
    config = model.config
    spec = check_config(config)
    vocab = build_vocab(tokenizer, config.vocab_size, chat_template, list(stop_tokens or []))
    weights = model.state_dict() if isinstance(model, nn.Module) else model  # or a stream
    tensors = named_tensors(weights, spec, config)  # raises before any file is opened
    head = "token_embd.weight" if "output.weight" not in dict(tensors) else "output.weight"
    qtype, file_type = QUANTS[quant]

    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_name(readable_gguf_name(path.stem))
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config, spec)
        vocab.add_to(writer)
        for name, hf_name in tensors:
            data = gguf_layout(name, weights[hf_name], spec, config)
            tensor_type = _T.Q8_0 if name == head and qtype in LOW_BIT else qtype
            add_tensor(writer, name, data, tensor_type)

    return write_atomically(path, spec.arch, write)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UnsupportedGGUFExport(
            f"unknown GGUF quant {quant!r}; choose one of {', '.join(QUANTS)}"
        )


def write_atomically(path: Path, arch: gguf.MODEL_ARCH, fill) -> Path:
    """Open a GGUF writer on a temporary file beside `path`, let `fill(writer)` add keys and
    tensors, write it out and move it into place; nothing is left behind on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (works for weights and biases)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name_map(spec: ArchSpec, config):
    return gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)


def gguf_tensor_name(names, hf_name: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`, or None if unmapped."""
    stem, _, suffix = hf_name.rpartition(".")
    gguf_name = names.get_name(stem)
    if gguf_name is None or suffix not in ("weight", "bias"):
        return None
    return f"{gguf_name}.{suffix}"


def named_tensors(
    state_dict: Mapping[str, torch.Tensor], spec: ArchSpec, config
) -> list[tuple[str, str]]:
    """(GGUF name, state-dict name) for every tensor of the model, in state-dict order; from the
    names alone (a streamed state dict computes each tensor when it is read)."""
    names = gguf_name_map(spec, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, unmapped = [], []
    for hf_name in state_dict:
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = gguf_tensor_name(names, hf_name)
        if gguf_name is None:
            unmapped.append(hf_name)
            continue
        out.append((gguf_name, hf_name))
    if unmapped:
        raise UnsupportedGGUFExport(
            f"tensors with no GGUF name for {gguf.MODEL_ARCH_NAMES[spec.arch]}: "
            f"{', '.join(unmapped[:5])}"
        )
    return out


def permute_rows(name: str, data: np.ndarray, spec: ArchSpec, config) -> np.ndarray:
    """Llama's q/k rows (weights, biases, or a LoRA B) in llama.cpp's interleaved RoPE order."""
    if spec.permute_qk and ".attn_q." in name:
        return _permute(data, config.num_attention_heads)
    if spec.permute_qk and ".attn_k." in name:
        return _permute(data, config.num_key_value_heads or config.num_attention_heads)
    return data


def gguf_layout(name: str, tensor: torch.Tensor, spec: ArchSpec, config) -> np.ndarray:
    """The tensor as an fp32 array in the layout llama.cpp expects for `name`."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if spec.norm_offset and name.endswith("norm.weight"):
        return data + 1.0  # Gemma: HF computes x * (1 + w)
    return permute_rows(name, data, spec, config)


def add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    if data.ndim < 2:
        qtype = _T.F32  # norms and biases: tiny, and precision-sensitive
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.quants.QuantError:
        # rows that do not fill whole blocks (32 values): llama.cpp's fallback is f16 too
        qtype = _T.F16
        packed = gguf.quants.quantize(data, qtype)
    if qtype in (_T.F32, _T.F16):
        writer.add_tensor(name, packed)  # the writer infers these types from the numpy dtype
    else:
        writer.add_tensor(
            name, packed, raw_dtype=qtype
        )  # uint8 blocks; the writer derives the shape
