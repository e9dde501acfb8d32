"""`method: peft`: any tuner peft implements, by its `peft_type`, with that config's own keys.

    adapter:
      method: peft
      peft_type: hra             # peft's name (HRA, FOURIERFT, C3A, SHIRA, VBLORA, ...)
      config: {r: 8, target_modules: [q_proj, v_proj]}

The keys of `config` are checked against the fields of peft's config dataclass for that type
(unknown ones get a "did you mean"), so a typo fails at the door, not after loading the model.
peftkit sets `task_type` itself. The result is saved in PEFT format and exported adapter-only
(merging is declared only by the first-class methods, whose merge is tested).
Types with their own section (lora, loha, lokr, vera, oft, boft, miss, ia3, prompt/prefix
tuning, adalora) are pointed there.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator, model_validator

from peftkit.methods.base import ApplyContext
from peftkit.methods.peft_method import PeftMethod
from peftkit.methods.registry import register

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

# peft types that have their own `adapter.method` (with options peftkit validates and tests)
FIRST_CLASS = {
    "LORA": "lora",
    "ADALORA": "adalora",
    "LOHA": "loha",
    "LOKR": "lokr",
    "IA3": "ia3",
    "VERA": "vera",
    "OFT": "oft",
    "BOFT": "boft",
    "MISS": "miss",
    "PROMPT_TUNING": "prompt_tuning",
    "PREFIX_TUNING": "prefix_tuning",
}
REFUSED = {
    "XLORA": "X-LoRA mixes several trained LoRA adapters; train those with method: lora",
    "POLY": "Poly needs task ids in every batch",
}
SET_BY_PEFTKIT = {"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode"}


def _config_class(peft_type: str):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)


@register
class AnyPeftSpec(PeftMethod):
    """Any peft tuner, by peft_type, with its config's keys validated against peft's fields."""

    method: Literal["peft"] = "peft"
    peft_type: str
    """peft's name of the tuner, e.g. hra, fourierft, c3a, shira (case-insensitive)."""
    config: dict[str, Any] = {}
    """The keyword arguments of peft's config class for that type (task_type is set by peftkit)."""

    @field_validator("peft_type")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _known_type_and_keys(self) -> AnyPeftSpec:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        kind = self.peft_type.upper()
        known = sorted(str(k.value) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
        if kind not in known:
            guess = difflib.get_close_matches(kind, known, n=1, cutoff=0.5)
            hint = f"; did you mean {guess[0].lower()!r}?" if guess else ""
            raise ValueError(f"peft has no tuner {self.peft_type!r}{hint}")
        if kind in FIRST_CLASS:
            raise ValueError(
                f"use adapter.method: {FIRST_CLASS[kind]} for {kind.lower()} (its options are "
                "validated and its export is tested)"
            )
        if kind in REFUSED:
            raise ValueError(f"peft_type {kind.lower()} is not supported: {REFUSED[kind]}")
        cls = _config_class(kind)
        if getattr(cls(), "is_prompt_learning", False):
            raise ValueError(
                f"{kind.lower()} adds virtual tokens; peftkit supports prompt_tuning and "
                "prefix_tuning as their own methods"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - SET_BY_PEFTKIT
        for key in self.config:
            if key in SET_BY_PEFTKIT:
                raise ValueError(f"adapter.config.{key} is set by peftkit; remove it")
            if key not in fields:
                guess = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.5)
                hint = f"; did you mean {guess[0]!r}?" if guess else ""
                raise ValueError(f"adapter.config.{key}: {cls.__name__} has no such field{hint}")
        return self

    def peft_config(self, model: nn.Module, ctx: ApplyContext) -> PeftConfig:
        return _config_class(self.peft_type)(task_type=ctx.task_type, **self.config)
