"""Write a transformers causal LM and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio).

The file is written with the `gguf` package, the library llama.cpp's own converter uses, and laid
out the way that converter lays it out, so llama.cpp and transformers' GGUF loader both read it:

- tensor names from `gguf.get_tensor_name_map` (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`);
- Llama-family q/k projections permuted per head from HF's rotate-half layout to the interleaved
  RoPE layout llama.cpp computes with: rows (head, 2, d/2) -> (head, d/2, 2). Readers undo it;
- weights rounded by `gguf.quants.quantize` (f16, bf16, q8_0); 1-D tensors (norms, biases) stay f32,
  and a 2-D tensor whose rows do not split into whole q8_0 blocks of 32 falls back to f16, as
  llama.cpp does;
- no `output.weight` when the head is tied to the embedding (readers infer the tie from its absence).

Supported: Llama (incl. SmolLM2 and other Llama-shaped configs), Mistral and Qwen2, with plain RoPE.
Mistral is written as llama.cpp's converter writes it, as architecture "llama" (no sliding window:
llama.cpp runs it as Llama, and transformers reads it back as a `LlamaForCausalLM`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from peftkit._compat import readable_gguf_name
from peftkit.errors import UnsupportedGGUFExport
from peftkit.export.gguf_vocab import build_vocab

# peftkit name -> (GGML type of 2-D weights, llama.cpp's file type)
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# transformers model_type -> GGUF architecture
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}
PERMUTED_ARCHS = (gguf.MODEL_ARCH.LLAMA,)  # llama.cpp's converter permutes q/k for these only


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
        model: a `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM` (any dtype; merged,
            without adapters).
        tokenizer: its transformers tokenizer (byte-level BPE, tokenizers backend).
        path: the file to write; its folder must exist. An existing file is replaced.
        quant: "f32", "f16", "bf16" or "q8_0" for the 2-D weights; 1-D tensors stay f32.
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
    if quant not in QUANTS:
        raise UnsupportedGGUFExport(
            f"unknown GGUF quant {quant!r}; choose one of {', '.join(QUANTS)}"
        )
    if hasattr(model, "peft_config"):
        raise UnsupportedGGUFExport("GGUF holds plain weights: merge the adapter first")
    config = model.config
    arch = _check_architecture(config)
    vocab = build_vocab(tokenizer, config.vocab_size, chat_template, list(stop_tokens or []))
    tensors = _named_tensors(model, arch, config)  # raises before any file is opened

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    try:
        _add_hyperparameters(writer, config, path.stem, QUANTS[quant][1])
        vocab.add_to(writer)
        for name, tensor in tensors:
            data = _gguf_layout(name, tensor, arch, config)
            _add_tensor(writer, name, data, QUANTS[quant][0])
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


def _check_architecture(config) -> gguf.MODEL_ARCH:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedGGUFExport(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        # llama.cpp would need rope scaling keys (and a rope_freqs tensor for "llama3") that
        # transformers' GGUF reader ignores, so the file could not be verified by reading it back.
        raise UnsupportedGGUFExport(
            f"GGUF export supports plain RoPE only, not rope_type {rope['rope_type']!r}"
        )
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedGGUFExport("GGUF export does not support Qwen2's sliding-window attention")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedGGUFExport("GGUF (llama architecture) has no MLP biases")
    return ARCHITECTURES[model_type]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hyperparameters(writer: gguf.GGUFWriter, config, stem: str, file_type) -> None:
    writer.add_name(readable_gguf_name(stem))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (works for weights and biases)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _named_tensors(
    model: nn.Module, arch: gguf.MODEL_ARCH, config
) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every tensor of the model, in state-dict order."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, unmapped = [], []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None or suffix not in ("weight", "bias"):
            unmapped.append(hf_name)
            continue
        out.append((f"{gguf_name}.{suffix}", tensor))
    if unmapped:
        raise UnsupportedGGUFExport(
            f"tensors with no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}: {', '.join(unmapped[:5])}"
        )
    return out


def _gguf_layout(name: str, tensor: torch.Tensor, arch: gguf.MODEL_ARCH, config) -> np.ndarray:
    """The tensor as an fp32 array in the layout llama.cpp expects for `name`."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if arch in PERMUTED_ARCHS and ".attn_q." in name:
        return _permute(data, config.num_attention_heads)
    if arch in PERMUTED_ARCHS and ".attn_k." in name:
        return _permute(data, config.num_key_value_heads or config.num_attention_heads)
    return data


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    if data.ndim < 2:
        qtype = gguf.GGMLQuantizationType.F32  # norms and biases: tiny, and precision-sensitive
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.quants.QuantError:
        # rows that do not fill whole blocks (q8_0: 32 values): llama.cpp's fallback is f16 too
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, packed)  # the writer infers these types from the numpy dtype
    else:
        writer.add_tensor(
            name, packed, raw_dtype=qtype
        )  # uint8 blocks; the writer derives the shape
