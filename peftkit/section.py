"""The base class of every recipe section: strict, so a misspelt key is an error, not a silent default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed recipe section. Unknown keys are rejected; values are validated on assignment too."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )
