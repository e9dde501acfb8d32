"""Where peftkit keeps what it caches: one root, one folder per kind, named here once.

    $PEFTKIT_CACHE (default ~/.cache/peftkit)/
        data/     encoded data sets, memory-mapped (`peftkit.data.cache`)
        gguf/     GGUF files dequantized once into plain model folders (`peftkit.models.gguf`)
        builtin/  the packaged tiny models, materialised (`peftkit.models.builtin`)

Everything under the root can be deleted: it is rebuilt on the next use (`peftkit prepare --prune`
trims the data folder by age and size).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """peftkit's cache: $PEFTKIT_CACHE or ~/.cache/peftkit (read at every call, so a process can
    point it elsewhere)."""
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def data_cache() -> Path:
    """Encoded data sets: cache_root()/data."""
    return cache_root() / "data"


def gguf_cache() -> Path:
    """Dequantized GGUF bases: cache_root()/gguf."""
    return cache_root() / "gguf"


def builtin_cache() -> Path:
    """Materialised built-in models: cache_root()/builtin."""
    return cache_root() / "builtin"
