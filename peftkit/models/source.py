"""Where a recipe's model and tokenizer load from, found without loading them (no torch, no
transformers): hub ids as named, `builtin:` models and GGUF files materialised into plain folders.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from peftkit.errors import ModelLoadError
from peftkit.models import builtin, gguf
from peftkit.models.spec import ModelSpec

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
"""Files a tokenizer never reads (model weights), left out of `tokenizer_files_sha`."""
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_source(name: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """Hub id or local path to hand to `from_pretrained`. `builtin:` models and GGUF files (a
    `.gguf` path, or `gguf_file` in a folder or hub repository) are materialised once into a
    plain folder in peftkit's cache, and that folder is returned."""
    if builtin.is_builtin(name):
        return builtin.materialize(name, log=logger.info)
    if gguf_file is not None or gguf.is_gguf(name):
        return gguf.materialize(gguf.locate(name, gguf_file, revision), log=logger.info)
    if is_local_path(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(
            f"{name}: no such folder (written as a local path, so not looked up on the hub)"
        )
    return name


def is_local_path(name: str) -> bool:
    """Written as a path, so never a hub id (which is `name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def model_source(spec: ModelSpec) -> str:
    """`resolve_source` of a recipe's model section."""
    return resolve_source(spec.name, spec.gguf_file, spec.revision)


def tokenizer_source(spec: ModelSpec) -> str:
    """What `AutoTokenizer.from_pretrained` is handed for a recipe's model section."""
    return resolve_source(spec.tokenizer) if spec.tokenizer else model_source(spec)


def tokenizer_folder(spec: ModelSpec) -> Path | None:
    """The local folder whose files alone decide the recipe's tokenizer, or None when that cannot
    be known without loading it: code shipped with the model (`trust_remote_code`), or a hub
    repository not in the local hub cache, or one online without a pinned commit (its branch
    may have moved on the hub)."""
    if spec.trust_remote_code:
        return None
    source = tokenizer_source(spec)
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import constants

    revision = spec.revision or "main"
    if not (constants.HF_HUB_OFFLINE or _COMMIT.fullmatch(revision)):
        return None
    repo = Path(constants.HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
    if not _COMMIT.fullmatch(revision):
        try:
            revision = (repo / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = repo / "snapshots" / revision
    return snapshot if snapshot.is_dir() else None


def tokenizer_files_sha(folder: Path) -> str:
    """sha256 of the names and bytes of every file a tokenizer may read in `folder`: all files
    but model weights and hidden ones, and the `additional_chat_templates/` folder."""
    digest = hashlib.sha256()
    extra = folder / "additional_chat_templates"
    files = [*folder.iterdir(), *(extra.iterdir() if extra.is_dir() else ())]
    for path in sorted(files):
        if (
            path.name.startswith(".")
            or path.name.lower().endswith(WEIGHT_SUFFIXES)
            or not path.is_file()
        ):
            continue
        digest.update(os.fsencode(path.relative_to(folder)) + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
