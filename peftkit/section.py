"""The base class of every recipe section: strict, so a misspelt key is an error, not a silent default."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed recipe section. Unknown keys are rejected; values are validated on assignment too."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


def error_message(err: dict[str, Any]) -> str:
    """A pydantic error's message, without the "Value error, " pydantic puts before our own."""
    return err["msg"].removeprefix("Value error, ")


def unknown_key_message(where: str, guess: str | None, valid: Iterable[str]) -> str:
    """The message for a misspelt key: the closest valid one, and all of them."""
    hint = f" Did you mean {guess!r}?" if guess else ""
    return f"{where}: unknown key.{hint} Valid keys here: {', '.join(valid)}"
