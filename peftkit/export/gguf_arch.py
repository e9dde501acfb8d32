"""What each transformers architecture looks like in GGUF: llama.cpp's architecture name, the
hyperparameters it reads, how tensors are laid out, and which configs it cannot represent.

Each entry follows llama.cpp's own converter (`convert_hf_to_gguf.py`) for that model class:

- Llama, Mistral: q/k rows permuted to the interleaved RoPE layout (`permute_qk`); Mistral is
  written as architecture "llama", as the converter does.
- Qwen2, Qwen3 (q/k norms), Phi-3 (fused `qkv_proj` and `gate_up_proj`, kept fused as llama.cpp's
  `attn_qkv` / `ffn_up`): no permutation (NeoX RoPE).
- Gemma 2 and Gemma 3: HF norms compute `x * (1 + w)`, llama.cpp's `x * w`, so every norm weight is
  written as `w + 1` (`norm_offset`); the `sqrt(hidden)` embedding scale is applied by both
  runtimes, so the embedding is written as is. llama.cpp fixes some things these configs could
  change (the attention scale 1/sqrt(head_dim), the sliding/full layer pattern, Gemma 3's local
  RoPE base), so configs that change them are refused rather than written wrong.

`check_config` runs on a config alone, so `peftkit export --format gguf` refuses a model before
loading or merging anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf

from peftkit.errors import UnsupportedGGUFExport


@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    """llama.cpp's converter permutes q/k rows to the interleaved RoPE layout (Llama only)."""
    norm_offset: bool = False
    """Gemma: HF norms scale by (1 + w); GGUF stores w + 1."""
    check: Callable[[object], None] = lambda config: None
    hyperparameters: Callable[[gguf.GGUFWriter, object], None] = lambda writer, config: None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, layer_type: str | None = None) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in rope:
        return rope[layer_type]  # Gemma 3: one RoPE per attention kind
    return rope


def _refuse_rope_scaling(config, *layer_types: str | None) -> None:
    for layer_type in layer_types or (None,):
        kind = _rope(config, layer_type).get("rope_type", "default")
        if kind != "default":
            # llama.cpp would need rope scaling keys (and a rope_freqs tensor for "llama3") that
            # transformers' GGUF reader ignores, so the file could not be verified by reading it back.
            raise UnsupportedGGUFExport(
                f"GGUF export supports plain RoPE only, not rope_type {kind!r}"
            )


def rope_theta(config, layer_type: str | None = None) -> float:
    return float(
        _rope(config, layer_type).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    )


def _check_llama(config) -> None:
    _refuse_rope_scaling(config)
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedGGUFExport(
            f"GGUF export does not support {config.model_type}'s sliding-window attention"
        )
    if getattr(config, "mlp_bias", False):
        raise UnsupportedGGUFExport("GGUF (llama architecture) has no MLP biases")


def _check_phi3(config) -> None:
    _refuse_rope_scaling(config)
    partial = _rope(config).get("partial_rotary_factor", 1.0) or 1.0
    if partial != 1.0:
        raise UnsupportedGGUFExport(
            f"GGUF export supports Phi-3 with full rotary embeddings only, not "
            f"partial_rotary_factor {partial}"
        )


def _phi3_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    # The converter writes 0 for "no sliding window" (how llama.cpp tells Phi-4 from Phi-3).
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(original)


def _check_gemma_common(config) -> None:
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedGGUFExport(
            f"llama.cpp runs Gemma with GELU (tanh), not {config.hidden_activation!r}"
        )
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim(config):
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for 27B only)
        raise UnsupportedGGUFExport(
            f"llama.cpp scales Gemma's attention by 1/sqrt(head_dim={head_dim(config)}); this "
            f"config's query_pre_attn_scalar is {scalar}"
        )


def _check_layer_pattern(config, period: int) -> None:
    """llama.cpp's Gemma: every `period`-th layer (1-based) has full attention, the rest slide."""
    expected = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    if list(getattr(config, "layer_types", None) or expected) != expected:
        raise UnsupportedGGUFExport(
            f"llama.cpp runs {config.model_type} with full attention on every {period}th layer "
            f"and sliding attention elsewhere; this config's layer_types differ"
        )


def _check_gemma2(config) -> None:
    _check_gemma_common(config)
    _refuse_rope_scaling(config)
    _check_layer_pattern(config, 2)
    if not getattr(config, "tie_word_embeddings", True):
        raise UnsupportedGGUFExport("llama.cpp's Gemma 2 has no separate output head (untied)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is None:
            # llama.cpp falls back to Gemma 2's defaults when the key is absent
            raise UnsupportedGGUFExport(f"llama.cpp's Gemma 2 always soft-caps; {key} is None")


def _gemma2_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's Gemma 3 sliding layers use this base


def _check_gemma3(config) -> None:
    _check_gemma_common(config)
    _refuse_rope_scaling(config, "full_attention", "sliding_attention")
    _check_layer_pattern(config, 6)
    local = rope_theta(config, "sliding_attention")
    if local != GEMMA3_LOCAL_ROPE_BASE:
        raise UnsupportedGGUFExport(
            f"llama.cpp's Gemma 3 sliding layers use RoPE base {GEMMA3_LOCAL_ROPE_BASE:g}, "
            f"this config's {local:g}"
        )
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            raise UnsupportedGGUFExport(f"llama.cpp's Gemma 3 does not soft-cap ({key} is set)")


def _gemma3_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    writer.add_rope_freq_base(rope_theta(config, "full_attention"))  # replaces the common one
    writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention"))
    writer.add_sliding_window(config.sliding_window)


# transformers model_type -> how it is written
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, check=_check_llama),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, check=_check_llama),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, check=_check_llama),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3, check=_check_llama),
    "phi3": ArchSpec(
        gguf.MODEL_ARCH.PHI3, check=_check_phi3, hyperparameters=_phi3_hyperparameters
    ),
    "gemma2": ArchSpec(
        gguf.MODEL_ARCH.GEMMA2,
        norm_offset=True,
        check=_check_gemma2,
        hyperparameters=_gemma2_hyperparameters,
    ),
    "gemma3_text": ArchSpec(
        gguf.MODEL_ARCH.GEMMA3,
        norm_offset=True,
        check=_check_gemma3,
        hyperparameters=_gemma3_hyperparameters,
    ),
}


MOE_ARCHITECTURES: dict[str, str] = {
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "mixtral": "llama",
    "olmoe": "olmoe",
    "gpt_oss": "gpt-oss",
    "deepseek_v3": "deepseek2",
}
"""transformers MoE model_type -> the llama.cpp architecture its converter writes. llama.cpp
stores the routed experts stacked (`blk.N.ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`, router
`blk.N.ffn_gate_inp`) with per-architecture hyperparameters (expert count, experts per token,
expert width, shared experts, gating function); peftkit's writer lays out dense models only, so
these are refused by name rather than written without their experts."""


def check_config(config) -> ArchSpec:
    """The architecture's spec, or UnsupportedGGUFExport naming what GGUF cannot hold."""
    model_type = getattr(config, "model_type", None)
    if model_type in MOE_ARCHITECTURES:
        raise UnsupportedGGUFExport(
            f"GGUF export does not write mixture-of-experts models: {model_type} would be "
            f"llama.cpp's {MOE_ARCHITECTURES[model_type]!r} with stacked expert tensors "
            "(blk.N.ffn_gate_exps/ffn_up_exps/ffn_down_exps, router ffn_gate_inp), a layout "
            "peftkit does not write; export merged safetensors (--format safetensors) and convert "
            "them with llama.cpp's convert_hf_to_gguf.py"
        )
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedGGUFExport(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}"
        )
    spec.check(config)
    return spec


def add_hyperparameters(writer: gguf.GGUFWriter, config, spec: ArchSpec) -> None:
    """The `<arch>.*` keys llama.cpp reads for this model (after `general.*`)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads or spec.norm_offset:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if spec.arch != gguf.MODEL_ARCH.GEMMA3:  # Gemma 3 writes its global and local bases
        writer.add_rope_freq_base(rope_theta(config))
    spec.hyperparameters(writer, config)
