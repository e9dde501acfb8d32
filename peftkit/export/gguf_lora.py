"""A PEFT LoRA adapter as a GGUF adapter file, for llama.cpp's `--lora` (and Ollama's `ADAPTER`).

Layout (llama.cpp's `convert_lora_to_gguf.py`): `general.type = "adapter"`, `adapter.type = "lora"`,
`adapter.lora.alpha`, and per adapted weight two tensors named after the base tensor,
`blk.0.attn_q.weight.lora_a` (A, shape (r, in)) and `.lora_b` (B, shape (out, r)). llama.cpp adds

    W x + (alpha / r) B A x          (r = the tensor's own rank, from B's shape)

so PEFT's per-module scaling `s` (alpha / r, alpha / sqrt(r) with rsLoRA, or a rank/alpha pattern)
is folded into B as `B * s * r / alpha`: exact for every module whatever its rank. Llama q/k
adapters get B's rows permuted exactly as the base rows are (`gguf.permute_rows`).

DoRA (a learned magnitude), biases, `modules_to_save` and LoRA on embeddings have no place in this
format and are refused before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit.errors import UnsupportedGGUFExport
from peftkit.export.gguf import (
    _T,
    add_tensor,
    gguf_name_map,
    gguf_tensor_name,
    permute_rows,
    write_atomically,
)
from peftkit.export.gguf_arch import ArchSpec, check_config

ADAPTER_QUANTS = {"f32": _T.F32, "f16": _T.F16, "bf16": _T.BF16}
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _module_scaling(module: str, config: dict) -> tuple[int, float]:
    """(rank, PEFT's scaling) of one adapted module, rank/alpha patterns included."""
    r, alpha = config["r"], config["lora_alpha"]
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            r = value
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def check_lora_config(config: dict) -> None:
    """UnsupportedGGUFExport for what a llama.cpp LoRA adapter cannot hold."""
    if config.get("peft_type") != "LORA":
        raise UnsupportedGGUFExport(
            f"llama.cpp adapters are LoRA; this adapter is {config.get('peft_type')}"
        )
    problems = {
        "use_dora": "DoRA's magnitude vectors",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "trainable_token_indices": "trained token rows",
    }
    for key, what in problems.items():
        if config.get(key):
            raise UnsupportedGGUFExport(f"a llama.cpp LoRA adapter cannot hold {what}")
    if config.get("bias", "none") != "none":
        raise UnsupportedGGUFExport("a llama.cpp LoRA adapter cannot hold trained biases")


def lora_tensors(
    adapter_dir: Path, spec: ArchSpec, base_config
) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(alpha to write, [(GGUF name, fp32 array)]) for the adapter in `adapter_dir`."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    check_lora_config(config)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    names = gguf_name_map(spec, base_config)
    alpha = float(config["lora_alpha"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise UnsupportedGGUFExport(f"a llama.cpp LoRA adapter cannot hold {key}")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    out = []
    for module, ab in pairs.items():
        name = gguf_tensor_name(names, f"{module}.weight")
        if name is None or name.startswith("token_embd"):
            raise UnsupportedGGUFExport(f"no llama.cpp LoRA tensor for {module}")
        rank, scaling = _module_scaling(module, config)
        a = ab["A"].to(torch.float32).numpy()  # (r, in)
        b = ab["B"].to(torch.float32).numpy() * (scaling * rank / alpha)  # (out, r)
        out.append((f"{name}.lora_a", a))
        out.append((f"{name}.lora_b", permute_rows(name, b, spec, base_config)))
    return alpha, out


def write_lora_gguf(adapter_dir: str | Path, base_config, path: str | Path, quant="f32") -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir` (trained on a model with `base_config`) as a
    llama.cpp GGUF adapter at `path`, atomically.

    Raises:
        UnsupportedGGUFExport: a base architecture or adapter feature llama.cpp cannot hold, or a
            `quant` other than f32 / f16 / bf16. Raised before anything is written.
    """
    if quant not in ADAPTER_QUANTS:
        raise UnsupportedGGUFExport(
            f"a GGUF LoRA adapter is written as {', '.join(ADAPTER_QUANTS)}, not {quant!r}"
        )
    path = Path(path)
    spec = check_config(base_config)
    alpha, tensors = lora_tensors(Path(adapter_dir), spec, base_config)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, data in tensors:
            add_tensor(writer, name, data, ADAPTER_QUANTS[quant])

    return write_atomically(path, spec.arch, fill)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def apply_lora_gguf(base: nn.Module, path: str | Path) -> nn.Module:
    """Read a GGUF LoRA adapter with `gguf`'s reader and add `(alpha / r) B A` to the matching
    weights of the transformers model `base` (in place), as llama.cpp would at inference; the
    read-back the export gate measures."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    config = base.config
    spec = check_config(config)
    names = gguf_name_map(spec, config)
    by_gguf = {gguf_tensor_name(names, n): n for n in base.state_dict()}
    arrays = {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            list(reversed(t.shape.tolist()))
        )
        for t in reader.tensors
    }
    params = dict(base.named_parameters())
    with torch.no_grad():
        for key, a in arrays.items():
            if not key.endswith(".lora_a"):
                continue
            name = key.removesuffix(".lora_a")
            b = arrays[f"{name}.lora_b"]
            if spec.permute_qk and ".attn_q." in name:
                b = _unpermute(b, config.num_attention_heads)
            elif spec.permute_qk and ".attn_k." in name:
                b = _unpermute(b, config.num_key_value_heads or config.num_attention_heads)
            weight = params[by_gguf[name]]
            delta = torch.from_numpy(b @ a) * (alpha / a.shape[0])
            weight.add_(delta.to(weight.dtype))
    return base
