"""Which GGML type each tensor gets in llama.cpp's k-quant mixes (Q4_K_M, Q5_K_S, ...).

A k-quant file is a mix: `Q4_K_M` stores most weights as Q4_K but gives the tensors quantization
hurts most more bits. The rules are those of `llama_tensor_get_type` in llama.cpp's
src/llama-quant.cpp (dense models, no importance matrix), so a file written here holds the same
type per tensor as `llama-quantize` would write:

- the output head, or the token embedding when the head is tied to it: Q6_K (Q8_0 when its rows
  are not whole super-blocks of 256);
- `attn_v` (and Phi-3's fused `attn_qkv`): Q6_K in Q4_K_M / Q5_K_M for the first and last eighth
  of the layers and every third one between (`use_more_bits`); Q5_K for the first 4 layers in
  Q4_K_S; Q5_K for the first 2 and Q4_K after in Q3_K_M; Q3_K (Q4_K with >= 4 query heads per KV
  head) in Q2_K;
- `ffn_down`: Q6_K for `use_more_bits` layers in Q4_K_M / Q5_K_M; Q5_K for the first eighth in
  Q4_K_S; Q5_K for the first sixteenth and Q4_K after in Q3_K_M; Q3_K in Q2_K;
- `attn_output`: Q4_K in Q3_K_M, Q3_K in Q2_K;
- the rest: the mix's base type. A tensor whose rows are not whole super-blocks falls back as
  llama.cpp's does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K / Q2_K -> Q4_0, and to F16
  when the rows do not split into blocks of 32 either.

Not replicated: llama.cpp's rules for mixture-of-experts models and Falcon (neither is an
architecture peftkit writes) and its bump of `attn_v` to Q5_K for 80-layer Llama 2/3 70B models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from peftkit.export.gguf_kquants import QK_K

_T, _F = gguf.GGMLQuantizationType, gguf.LlamaFileType


@dataclass(frozen=True)
class KMix:
    base: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


# peftkit name -> the mix (the names are llama-quantize's, lower-cased)
K_MIXES = {
    "q6_k": KMix(_T.Q6_K, _F.MOSTLY_Q6_K),
    "q5_k_m": KMix(_T.Q5_K, _F.MOSTLY_Q5_K_M),
    "q5_k_s": KMix(_T.Q5_K, _F.MOSTLY_Q5_K_S),
    "q4_k_m": KMix(_T.Q4_K, _F.MOSTLY_Q4_K_M),
    "q4_k_s": KMix(_T.Q4_K, _F.MOSTLY_Q4_K_S),
    "q3_k_m": KMix(_T.Q3_K, _F.MOSTLY_Q3_K_M),
    "q2_k": KMix(_T.Q2_K, _F.MOSTLY_Q2_K),
}
_FALLBACK = {
    _T.Q6_K: _T.Q8_0,
    _T.Q5_K: _T.Q5_1,
    _T.Q4_K: _T.Q5_0,
    _T.Q3_K: _T.Q4_0,
    _T.Q2_K: _T.Q4_0,
}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mixed_type(quant: str, name: str, layer: int, n_layers: int, n_gqa: int):
    """The type the mix asks for before the shape fallback (`llama_tensor_get_type_impl`)."""
    mix = K_MIXES[quant]
    if name.endswith(("attn_v.weight", "attn_qkv.weight")):
        if quant == "q2_k":
            return _T.Q4_K if n_gqa >= 4 else _T.Q3_K
        if quant == "q3_k_m":
            return _T.Q5_K if layer < 2 else _T.Q4_K
        if quant in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return _T.Q6_K
        if quant == "q4_k_s" and layer < 4:
            return _T.Q5_K
    elif "ffn_down" in name:
        if quant == "q2_k":
            return _T.Q3_K
        if quant == "q3_k_m":
            return _T.Q5_K if layer < n_layers // 16 else _T.Q4_K
        if quant in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return _T.Q6_K
        if quant == "q4_k_s" and layer < n_layers // 8:
            return _T.Q5_K
    elif name.endswith("attn_output.weight"):
        if quant == "q2_k":
            return _T.Q3_K
        if quant == "q3_k_m":
            return _T.Q4_K
    return mix.base


def k_mix_type(
    quant: str, name: str, row_size: int, n_layers: int, n_gqa: int, head: bool
) -> gguf.GGMLQuantizationType:
    """The GGML type of the 2-D weight `name` (a GGUF tensor name such as `blk.3.attn_v.weight`)
    in the k-quant mix `quant`.

    Args:
        quant: a key of `K_MIXES`.
        name: the tensor's GGUF name.
        row_size: values per row (the tensor's last dimension, GGUF's ne[0]).
        n_layers: the model's transformer blocks.
        n_gqa: query heads per key/value head.
        head: the tensor is the output head (`output.weight`, or `token_embd.weight` when tied).
    """
    if head:
        return _T.Q8_0 if row_size % QK_K else _T.Q6_K
    match = _LAYER.match(name)
    qtype = _mixed_type(quant, name, int(match.group(1)) if match else 0, n_layers, n_gqa)
    if row_size % QK_K:
        qtype = _FALLBACK[qtype]
        if row_size % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = _T.F16
    return qtype
