"""What makes two tokenizers the same tokenizer: one definition, for every check that asks.

A tokenizer's identity has four parts, each a sha256:

  vocabulary      every token and its id (added tokens included)
  special tokens  the special-token roles (bos, eos, unk, ..., additional special tokens) and
                  every added token with its flags (special, normalized, lstrip, rstrip,
                  single_word): they decide which text is never split
  rules           how text becomes tokens: a fast tokenizer's serialisation (normaliser,
                  pre-tokenizer, model, post-processor, decoder), without the padding and
                  truncation settings a call leaves behind; a slow tokenizer's class
  chat template   the tokenizer's own chat template (None: it has none)

The pad token is left out: peftkit sets it where a tokenizer has none (`models.load`), and no
encoded row depends on it. The data cache key and `--resume` compare the whole identity; an
adapter's manifest records all but the chat template (it records the template training used on
its own: a different template does not make an adapter unusable).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PARTS = ("vocabulary", "special tokens", "rules", "chat template")
_CALL_STATE = ("padding", "truncation")
"""Settings of the last call that a fast tokenizer's serialisation carries: not the tokenizer."""


def _sha(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class TokenizerIdentity:
    """{part: sha256} of one tokenizer (see the module docstring)."""

    parts: dict[str, str | None]

    def sha(self, without: tuple[str, ...] = ()) -> str:
        """One sha256 of the parts (less `without`)."""
        return _sha({k: v for k, v in self.parts.items() if k not in without})

    def differences(self, other: dict[str, str | None]) -> list[str]:
        """The parts in which `other` (another identity's parts) differs from this one."""
        return [p for p in PARTS if p in self.parts and self.parts[p] != other.get(p)]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> TokenizerIdentity:
    """The identity of `tokenizer`: two tokenizers that differ in their vocabulary, a special or
    added token, their rules or their chat template have different identities."""
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}
    # the additional special tokens: transformers 5 names them `extra_special_tokens`
    extra = getattr(tokenizer, "extra_special_tokens", None)
    if extra is None:
        extra = getattr(tokenizer, "additional_special_tokens", None)
    specials["extra"] = sorted(map(str, extra or ()))
    added = {
        str(i): [t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word]
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        rules = {k: v for k, v in json.loads(backend.to_str()).items() if k not in _CALL_STATE}
    else:
        rules = type(tokenizer).__name__
    template = tokenizer.chat_template
    return TokenizerIdentity(
        {
            "vocabulary": _sha(sorted(tokenizer.get_vocab().items())),
            "special tokens": _sha([specials, added]),
            "rules": _sha(rules),
            "chat template": None if template is None else _sha(template),
        }
    )
