"""The base class of every recipe section: strict, so a misspelt key is an error, not a silent default."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict

RESUMABLE: dict[str, Any] = {"resumable": True}
"""`Field(json_schema_extra=RESUMABLE)` marks a recipe field that may change when a run is resumed:
it does not change the math of the steps already taken, only how long or how often things happen,
or (lr, clipping, warmup: what the advice after a divergence tells the user to change) the steps
still to come; batching (packing, token budgets, length grouping, supervised-only logits)
changes only the float summation order (tests/e2e/test_training_math.py). A section field so
marked covers everything in it. Each change a resume makes is recorded in RUN/resumes.jsonl;
every other field must equal the run's (`resumable_paths` reads the marks, the run directory's
check refuses the rest)."""


class Section(BaseModel):
    """A typed recipe section. Unknown keys are rejected; values are validated on assignment too."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


def resumable_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of the fields of `cls`, and of the sections it holds, marked RESUMABLE."""
    paths = []
    for name, info in cls.model_fields.items():
        if (info.json_schema_extra or {}).get("resumable"):
            paths.append(f"{prefix}{name}")
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            paths += resumable_paths(info.annotation, f"{prefix}{name}.")
    return paths


def error_message(err: dict[str, Any]) -> str:
    """A pydantic error's message, without the "Value error, " pydantic puts before our own."""
    return err["msg"].removeprefix("Value error, ")


def unknown_key_message(where: str, guess: str | None, valid: Iterable[str]) -> str:
    """The message for a misspelt key: the closest valid one, and all of them."""
    hint = f" Did you mean {guess!r}?" if guess else ""
    return f"{where}: unknown key.{hint} Valid keys here: {', '.join(valid)}"
