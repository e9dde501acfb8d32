"""The data cache's key: a sha256 of everything that changes the encoding (the data files'
contents and paths, the tokenizer's identity (`models.tokenizer_identity`), the chat template,
the data section, the hold-out seed, the library versions), so a cached data set is reused only
when it is the same data encoded the same way."""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.data.fingerprint import source_sha
from peftkit.data.sources import looks_like_local_path
from peftkit.data.spec import DataSpec
from peftkit.models.tokenizer_identity import tokenizer_identity

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


LAYOUT = 3
"""Bumped whenever the files or the encoding change, so older caches are never read."""


def data_key(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    seed: int,
    task: dict[str, Any] | None = None,
) -> str | None:
    """The cache key of a data section (and, for task heads, the task section), or None when a
    source cannot be fingerprinted (a hub dataset without `revision` may change under the same
    name)."""
    parts = content_parts(spec, seed, task)
    if parts is None:
        return None
    payload = {**parts, "tokenizer": tokenizer_identity(tokenizer).sha(), "chat_template": template}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def content_parts(
    spec: DataSpec, seed: int, task: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What the cache key hashes besides the tokenizer and the chat template: the layout, the
    data section, the sources' contents, the task section, the hold-out seed and the versions of
    the libraries that encode (read from their metadata: nothing is imported). None when a
    source cannot be fingerprinted."""
    shas = []
    for source in spec.sources:
        sha = source_sha(Path(source.path).expanduser())
        if sha is None and source.revision is None:
            if not looks_like_local_path(source.path):  # (a missing file is reported by reading)
                log.info("data not cached: hub dataset %s has no revision to pin", source.path)
            return None
        shas.append(sha)
    return {
        "layout": LAYOUT,
        "data": spec.model_dump(mode="json", exclude={"cache", "num_proc", "mixing"}),
        "sources": shas,
        "task": task,
        "seed": seed if spec.eval_fraction > 0 and not spec.eval else None,
        "versions": [metadata.version(n) for n in ("transformers", "tokenizers", "datasets")],
    }
