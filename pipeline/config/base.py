"""Base class of every config section: frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed config section. Unknown keys are an error (checked with a 'did you mean')."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
