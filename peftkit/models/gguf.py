"""GGUF files as base models: the model a user already runs in llama.cpp or Ollama, fine-tuned.

transformers reads GGUF (with the `gguf` package) by dequantizing every tensor, which takes tens of
seconds even for a 135M model, and the model it returns keeps a GGUF "quantizer" attached that
`save_pretrained` refuses. peftkit therefore materialises each GGUF file once, keyed by the sha256
of its content, into a plain folder in its cache:

    ~/.cache/peftkit/gguf/<file stem>-<sha256[:16]>/
        config.json  model.safetensors (fp32)  tokenizer files + chat template  peftkit_gguf.json

The dequantized fp32 weights in that folder are *the base*: training, the adapter manifest, merge,
export and the fidelity gate all read them, so a merged export is compared against exactly the
weights the adapter was trained on (not against some other precision of the same model). fp32,
because a dequantized block value `d * q + m` (fp16 scale and minimum) is not exact in 16 bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from peftkit.caches import gguf_cache
from peftkit.errors import ModelLoadError

SUFFIX = ".gguf"
INFO = "peftkit_gguf.json"
LAYOUT = 2
"""Version of what a cache folder holds; part of its name, so a change rebuilds (2: digit-splitting
pre-tokenizers restored)."""
_HASH_INDEX = "hashes.json"


def is_gguf(name: str) -> bool:
    return name.lower().endswith(SUFFIX)


def locate(name: str, gguf_file: str | None = None, revision: str | None = None) -> Path:
    """The local GGUF file a recipe names: `name` itself (a .gguf path), or `gguf_file` inside the
    local folder or hub repository `name` (downloaded once into the hub cache)."""
    if gguf_file is None:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist (model.name ends in .gguf)")
        return path
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in folder.glob(f"*{SUFFIX}"))
            raise ModelLoadError(
                f"model.gguf_file {gguf_file!r} is not in {folder}; GGUF files there: "
                f"{', '.join(found) or 'none'}"
            )
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, gguf_file, revision=revision))
    except Exception as e:
        raise ModelLoadError(
            f"could not fetch {gguf_file!r} from the hub repository {name!r}: {e}\n  hint: check "
            "the repository and file names, network access and HF_TOKEN for gated models"
        ) from e


def file_sha256(path: Path) -> str:
    """sha256 of the file's content, remembered per (path, size, mtime) so a multi-GB file is
    hashed once, not at every load."""
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = gguf_cache() / _HASH_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    index[key] = digest.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_name(f"{_HASH_INDEX}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(index_path)
    return index[key]


def materialize(path: Path, log=None) -> str:
    """The cache folder holding `path`'s dequantized weights, tokenizer and chat template; built
    on first use (atomically: a half-built folder is never seen by another process)."""
    digest = file_sha256(path)
    stem = path.name[: -len(SUFFIX)] if is_gguf(path.name) else path.name
    target = gguf_cache() / f"{stem}-{digest[:16]}-v{LAYOUT}"
    if (target / INFO).exists():
        return str(target)
    if log is not None:
        log(f"dequantizing {path.name} once into {target} (later loads read that folder)")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = _build(path, tmp)
        info["sha256"] = digest
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            tmp.replace(target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def read_info(folder: str | Path) -> dict[str, Any] | None:
    """What `materialize` recorded about the GGUF file behind a cache folder (None otherwise)."""
    try:
        return json.loads((Path(folder) / INFO).read_text())
    except (OSError, ValueError):
        return None


def _build(path: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import _compat

    architecture, pre, quant_types = _describe(path)
    supported = _compat.gguf_architectures()
    if architecture not in supported:
        raise ModelLoadError(
            f"{path.name}: GGUF architecture {architecture!r} cannot be read by transformers "
            f"(it reads {', '.join(sorted(supported))})"
        )
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=_compat.gguf_dequantize_config(),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not read the GGUF file {path}: {e}") from e
    _compat.detach_gguf_quantizer(model)
    restored = _compat.restore_gguf_pre_tokenizer(tokenizer, pre)
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {
        "file": path.name,
        "architecture": architecture,
        "tensor_types": quant_types,
        "pre_tokenizer": pre,
        "digit_splitting_restored": restored,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _describe(path: Path) -> tuple[str, str | None, dict[str, int]]:
    """The file's architecture name, tokenizer pre-tokenizer name (`tokenizer.ggml.pre`), and how
    many tensors of each type (Q4_1, F32, ...) it holds."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF file without general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode()
    pre_field = reader.fields.get("tokenizer.ggml.pre")
    pre = bytes(pre_field.parts[pre_field.data[0]]).decode() if pre_field else None
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return architecture, pre, types
