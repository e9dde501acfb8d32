"""Finding a recipe's encoded data before its tokenizer is loaded: a cached start that imports
neither transformers nor torch.

The data cache is keyed by content (`key.data_key`), and part of that content is the tokenizer's
own serialisation, which needs the tokenizer loaded (transformers imports torch: seconds). So
whenever a recipe's data is prepared, `remember` also records which cache folder holds it under a
*start key*: everything the data key is made of, except that the tokenizer is given by what
decides it before it is loaded (the model section that names it, the bytes of its files:
`models.source.tokenizer_files_sha`) and the chat template by the recipe's setting and, for a
template file, its text. The same start key loads the same tokenizer and resolves the same
template, so it stands for the same data key. `find` computes the start key from files alone and
maps the recorded folder.

No record, a record whose folder was pruned, or a tokenizer that its files cannot pin down (code
shipped with the model, a hub repository online without a pinned commit): `find` returns None and
the caller loads the tokenizer and computes the data key as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.data.cache import key, store
from peftkit.data.chat import ChatTemplate
from peftkit.data.pipeline import PreparedData
from peftkit.errors import PeftkitError
from peftkit.io import atomic_write_json
from peftkit.models.source import tokenizer_files_sha, tokenizer_folder

if TYPE_CHECKING:
    from peftkit.data.spec import Recipe

log = logging.getLogger(__name__)

STARTS = "starts"
"""Folder (in the data cache) of the records: one small JSON file per start key."""


def start_key(recipe: Recipe) -> str | None:
    """The start key of a recipe's data (None: the data or the tokenizer cannot be pinned by
    files alone)."""
    kind = recipe.objective_kind  # what, besides the data section, decides the rows
    parts = key.content_parts(recipe.data, recipe.data_seed, kind.data_key(recipe))
    folder = tokenizer_folder(recipe.model)
    if parts is None or folder is None:
        return None
    setting, template_file = recipe.data.chat_template, None
    inline = "{{" in setting or "{%" in setting
    if setting not in ("auto", "tokenizer", "fallback") and not inline:  # a template file
        path = Path(setting).expanduser()
        if not path.is_file():
            return None  # (resolving the template reports it)
        template_file = path.read_text()
    payload = {
        **parts,
        "tokenizer": {
            "model": recipe.model.model_dump(
                mode="json",
                include={"name", "gguf_file", "revision", "tokenizer", "trust_remote_code"},
            ),
            "files": tokenizer_files_sha(folder),
            "needs_eos": kind.needs_eos,
        },
        "chat_template_file": template_file,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _record(key: str) -> Path:
    return store.data_root() / STARTS / f"{key[:32]}.json"


def key_of(recipe: Recipe) -> str | None:
    """`start_key`, or None where it cannot be computed (an unreadable file or a bad model name:
    loading the tokenizer says why)."""
    try:
        return start_key(recipe)
    except (OSError, PeftkitError):
        return None


def find(recipe: Recipe, key: str | None = None) -> PreparedData | None:
    """The recipe's data from the cache folder its start key (`key`, computed when not given)
    recorded (rows memory-mapped), or None when there is none."""
    key = key or key_of(recipe)
    if key is None:
        return None
    try:
        record = json.loads(_record(key).read_text())
        folder = store.data_root() / record["folder"]
        template = ChatTemplate(**record["chat_template"])
    except (OSError, ValueError, KeyError, TypeError):  # no record (or not one of ours)
        return None
    if not (folder / "meta.json").is_file():
        return None  # pruned since
    log.info("encoded data found in %s", folder)
    return recipe.objective_kind.mapped_data(folder, template)


def remember(key: str | None, data: PreparedData) -> None:
    """Record the cache folder of a recipe's data under its start key `key` (nothing when the
    data is not cached or the key could not be computed)."""
    if data.cache_dir is None or key is None:
        return
    record: dict[str, Any] = {
        "folder": Path(data.cache_dir).name,
        "chat_template": {
            "template": data.chat_template.template,
            "source": data.chat_template.source,
        },
    }
    path = _record(key)
    store.data_root().mkdir(mode=0o700, parents=True, exist_ok=True)  # (only this user's)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write_json(path, record)
