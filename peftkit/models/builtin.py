"""The built-in quickstart model: a small Llama-architecture model with *random* weights.

`builtin:tiny-llama` is built on first use from a config defined here and the BPE tokenizer
shipped in `peftkit/assets/tiny-llama/` (trained on the quickstart data), then cached. It knows
nothing before training: it exists so that the quickstart runs offline on any CPU in minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
_CONFIGS = {
    "tiny-llama": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    }
}


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def materialize(name: str) -> str:
    """Build (once) and return the local folder of a built-in model."""
    key = name[len(PREFIX) :]
    if key not in _CONFIGS:
        raise ValueError(
            f"unknown built-in model {name!r}; available: {', '.join(PREFIX + k for k in _CONFIGS)}"
        )
    assets = ASSETS / key
    digest = hashlib.sha256(json.dumps(_CONFIGS[key], sort_keys=True).encode())
    for f in sorted(assets.iterdir()):
        digest.update(f.read_bytes())
    target = cache_root() / "builtin" / f"{key}-{digest.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return str(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(key, assets, tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _build(key: str, assets: Path, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(assets))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_CONFIGS[key],
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
