"""Fingerprints of what a run reads besides its recipe: data files, tokenizer, chat template.

The recipe names a data file by path; `--resume` must also notice when the file behind the path
changed (it would continue silently on other data). The fingerprints are recorded in the run at
its start (RUN/inputs.json) and compared on every resume. The tokenizer is recorded by its whole
identity (`models.tokenizer_identity`: vocabulary, special and added tokens, rules, its own chat
template), so a resume names the part that changed. (Runs recorded before identities hold one
narrower sha there: their resume is refused as a changed tokenizer.)
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from peftkit.data.fingerprint import source_sha
from peftkit.errors import RunDirError
from peftkit.io import RunLayout, atomic_write_json
from peftkit.models.manifest import chat_template_fingerprint
from peftkit.models.tokenizer_identity import tokenizer_identity
from peftkit.recipe.schema import DataSpec

Print = str | dict[str, str | None] | None


def fingerprints(
    data: DataSpec, tokenizer: PreTrainedTokenizerBase, chat_template: str | None
) -> dict[str, Print]:
    """{what: fingerprint} of every local data source, the tokenizer and the chat template."""
    out: dict[str, Print] = {f"data file {s.path}": source_sha(Path(s.path)) for s in data.sources}
    out["tokenizer"] = tokenizer_identity(tokenizer).parts
    out["chat template"] = chat_template_fingerprint(chat_template)
    return out


def record(run: RunLayout, prints: dict[str, Print]) -> None:
    atomic_write_json(run.inputs, prints)


def check_unchanged(run: RunLayout, prints: dict[str, Print]) -> None:
    """Refuse a resume whose inputs differ from those the run started with, naming each one."""
    if not run.inputs.is_file():
        return  # a run made before inputs were recorded: nothing to compare with
    try:
        saved = json.loads(run.inputs.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(
            f"--resume: {run.inputs} is damaged ({e}); cannot check the inputs"
        ) from e
    changed = [
        what for what in sorted(set(saved) | set(prints)) if saved.get(what) != prints.get(what)
    ]
    if changed:
        raise RunDirError(
            f"--resume: what {run.path} was trained on has changed since: "
            + "; ".join(_describe(what, saved, prints) for what in changed)
            + ". Resuming would not continue the same run: restore them, or train into a new "
            "output.dir"
        )


def _describe(what: str, saved: dict, now: dict) -> str:
    if what not in saved:
        return f"{what} is new"
    if what not in now:
        return f"{what} is no longer used"
    if now[what] is None:
        return f"{what} is gone"
    if isinstance(now[what], dict) and isinstance(saved[what], dict):  # the tokenizer's parts
        parts = [p for p in now[what] if saved[what].get(p) != now[what][p]]
        return f"{what} has other {', '.join(parts)}"
    return f"{what} has other contents"
