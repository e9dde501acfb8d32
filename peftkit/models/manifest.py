"""The adapter manifest: which base model and tokenizer an adapter was trained on, checkable at load.

Every result folder peftkit writes holds `peftkit_adapter.json`. Loading an adapter onto a base
whose fingerprint differs is refused: LoRA weights learned on one model are noise on another, and
the failure would otherwise be silent (shapes often match across fine-tunes of one architecture).

Base fingerprint, computed from the loaded model *before* the adapter is attached:
  config   sha256 of the model config, without fields that do not change the function
           (dtype, paths, cache and attention-kernel settings, quantization)
  shapes   sha256 of every parameter's name and logical shape (4-bit packed weights count as the
           shape they represent)
  weights  sha256 of every 1-D floating tensor (norms, biases) rounded to bf16 — a few thousand
           values that differ between fine-tunes sharing one architecture (base vs instruct), and
           that the storage dtype and 4/8-bit loading leave unchanged after that rounding.
Tokenizer fingerprint: the tokenizer's identity (`models.tokenizer_identity`: vocabulary, special
and added tokens, encoding rules) without its chat template, which is fingerprinted separately: a
different template does not make an adapter unusable, it is the adapter's own template that
generation must use. Manifests of format 1 recorded a narrower fingerprint (vocabulary and special
tokens); they are checked against that one.

How training rendered its prompts is recorded under `prompt` (`training_prompt`): the chat template
(its text and where it came from) and the system prompt every chat without one was given, so that
serving and exports can render a request the way training did. Manifests written before `prompt`
existed have none: they are served as before (no default system turn).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

import peftkit
from peftkit.errors import AdapterMismatchError
from peftkit.io import MANIFEST, atomic_write_json
from peftkit.models import gguf
from peftkit.models.layers import TASK_HEADS
from peftkit.models.tokenizer_identity import tokenizer_identity

FORMAT = 2
"""2: the tokenizer fingerprint is `tokenizer_identity` (1: vocabulary and special tokens)."""
_CONFIG_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "quantization_config",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "_commit_hash",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "pad_token_id",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_sha(value: Any) -> str:
    return _sha(json.dumps(value, sort_keys=True, default=str).encode())


def _clean_name(name: str) -> str:
    """Parameter name as in the plain model (peft wraps targeted layers in `.base_layer`)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _logical_shape(p: torch.Tensor) -> list[int]:
    state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: packed uint8 storage
    return list(state.shape) if state is not None else list(p.shape)


def base_fingerprint(model: nn.Module) -> dict[str, str]:
    """Fingerprint of a loaded base model (see the module docstring); cheap even for 70B models."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_IGNORED}
    params = sorted(
        (_clean_name(n), p)
        for n, p in model.named_parameters()
        if _clean_name(n).split(".")[0] not in TASK_HEADS  # a new task head starts random
    )
    shapes = [(n, _logical_shape(p)) for n, p in params]
    weights = hashlib.sha256()
    for name, p in params:
        if p.dim() == 1 and p.is_floating_point():
            weights.update(name.encode())
            values = p.detach().to("cpu", torch.bfloat16).contiguous()
            weights.update(values.view(torch.int16).numpy().tobytes())
    return {
        "config": _json_sha(config),
        "shapes": _json_sha(shapes),
        "weights": weights.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """The manifest's tokenizer fingerprint: the identity less the chat template."""
    return tokenizer_identity(tokenizer).sha(without=("chat template",))


def _format1_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What manifests of format 1 recorded (vocabulary and special tokens but the pad and the
    additional ones): read only to check adapters written by those versions."""
    specials = {
        k: str(v)
        for k, v in tokenizer.special_tokens_map.items()
        if k not in ("pad_token", "additional_special_tokens")
    }
    return _json_sha([sorted(tokenizer.get_vocab().items()), specials])


def chat_template_fingerprint(template: str | None) -> str | None:
    return _sha(template.encode()) if template else None


VARIED = "varied per row"


def training_prompt(
    chat_template: str | None,
    template_source: str,
    system_prompt: str | None,
    system_turns: list[str],
) -> dict[str, Any]:
    """The manifest's `prompt` record: how training rendered the chats.

    Args:
        chat_template: the template the chats were rendered with.
        template_source: 'tokenizer', 'fallback', 'recipe' or the file it was read from.
        system_prompt: the recipe's `data.system_prompt` (given to chats that had no system turn).
        system_turns: the chats' leading system turns as rendered ("" = none), up to two distinct.

    `system_prompt` is the default system prompt: what serving and exports give a request
    without a system turn (only the recipe's: a recipe without one is served as before, whatever
    its rows held). `system_turns` says what the rendered chats began with: "none", "one" (every
    chat the same system turn) or "varied per row".
    """
    distinct = set(system_turns)
    one = len(distinct) == 1 and "" not in distinct
    return {
        "chat_template": chat_template,
        "chat_template_source": template_source,
        "system_prompt": system_prompt,
        "system_turns": VARIED if len(distinct) > 1 else "one" if one else "none",
    }


def default_system_prompt(manifest: dict[str, Any] | None) -> str | None:
    """The system prompt training gave chats without one; None for manifests that predate it."""
    return ((manifest or {}).get("prompt") or {}).get("system_prompt")


@dataclass
class BaseIdentity:
    """What a loaded base model and its tokenizer are, to compare with adapters' manifests."""

    name: str
    fingerprint: dict[str, str]
    tokenizer: str
    """`tokenizer_fingerprint` of the base's tokenizer."""
    gguf: dict[str, Any] | None = None
    """For a base read from a GGUF file: that file's name, sha256, architecture and tensor types
    (the dequantized weights of exactly that file are the base)."""
    tokenizer_parts: dict[str, str | None] = field(default_factory=dict)
    """The tokenizer identity's parts but the chat template (manifests name the ones that differ)."""
    format1_tokenizer: str | None = None
    """The fingerprint manifests of format 1 recorded, to check adapters written by those."""

    @classmethod
    def of(cls, name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> BaseIdentity:
        source = gguf.read_info(getattr(model, "name_or_path", "") or "")
        parts = dict(tokenizer_identity(tokenizer).parts)
        parts.pop("chat template")
        return cls(
            name,
            base_fingerprint(model),
            tokenizer_fingerprint(tokenizer),
            source,
            parts,
            _format1_fingerprint(tokenizer),
        )


def write_manifest(
    out_dir: Path,
    base: BaseIdentity,
    *,
    method: str,
    chat_template: str | None,
    stop_tokens: list[str],
    recipe: dict[str, Any] | None,
    quantization: dict[str, Any] | None = None,
    derived_from: dict[str, Any] | None = None,
    prompt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `peftkit_adapter.json` into an adapter (or model) folder and return it.

    `prompt` is `training_prompt`'s record (None: not known, e.g. a combined adapter)."""
    manifest = {
        "format": FORMAT,
        "peftkit_version": peftkit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": method,
        "base_model": {
            "name": base.name,
            "fingerprint": base.fingerprint,
            "quantization": quantization,
            **({"gguf": base.gguf} if base.gguf else {}),
        },
        "tokenizer": {
            "fingerprint": base.tokenizer,
            "parts": base.tokenizer_parts,
            "chat_template": chat_template_fingerprint(chat_template),
        },
        "stop_tokens": stop_tokens,
        **({"prompt": prompt} if prompt is not None else {}),
        "recipe": recipe,
        "derived_from": derived_from,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(adapter_dir: Path) -> dict[str, Any] | None:
    path = adapter_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_compatible(
    name: str,
    adapter_dir: Path,
    manifest: dict[str, Any] | None,
    base: BaseIdentity,
    allow_mismatch: bool = False,
) -> list[str]:
    """Refuse an adapter made for another base or tokenizer; returns warnings when allowed anyway.

    Raises:
        AdapterMismatchError: naming what differs, unless `allow_mismatch`.
    """
    if manifest is None:
        problems = _check_plain_peft(adapter_dir, base)
        if not problems:
            return [
                f"adapter {name!r} ({adapter_dir}) has no {MANIFEST} (not made by peftkit): "
                "its base model could only be checked by name"
            ]
    else:
        problems = []
        trained = manifest["base_model"]
        for part, mine in base.fingerprint.items():
            theirs = trained["fingerprint"].get(part)
            if theirs != mine:
                problems.append(
                    f"base model {part} differ (trained on {trained['name']!r}, "
                    f"{str(theirs)[:12]}; loaded {base.name!r}, {mine[:12]})"
                )
        problems += _tokenizer_problems(manifest, base)
    if not problems:
        return []
    message = f"adapter {name!r} ({adapter_dir}) does not belong to this base model: " + "; ".join(
        problems
    )
    if not allow_mismatch:
        raise AdapterMismatchError(
            message + ". Its outputs would be meaningless. Load the base it was trained on, or "
            "allow the mismatch knowingly (allow_mismatch=True, --allow-base-mismatch)"
        )
    return [message + " (loaded anyway: mismatch allowed)"]


def _tokenizer_problems(manifest: dict[str, Any], base: BaseIdentity) -> list[str]:
    recorded = manifest["tokenizer"]
    if manifest.get("format", 1) < 2:
        if recorded["fingerprint"] != base.format1_tokenizer:
            return ["tokenizer differs (vocabulary or special tokens)"]
        return []
    if recorded["fingerprint"] == base.tokenizer:
        return []
    named = [
        p for p, v in base.tokenizer_parts.items() if (recorded.get("parts") or {}).get(p) != v
    ]
    return [f"tokenizer differs ({', '.join(named) or 'vocabulary, special tokens or rules'})"]


def _check_plain_peft(adapter_dir: Path, base: BaseIdentity) -> list[str]:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        return []
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if recorded and Path(recorded).name != Path(base.name).name:
        return [f"adapter_config.json names base {recorded!r}, loaded {base.name!r}"]
    return []
