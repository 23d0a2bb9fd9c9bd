"""Base class of every config section: frozen, strict, finite, unknown keys rejected."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SEED_MAX = 2**63 - 1  # seeds are non-negative and fit torch's and numpy's generators


def _list_as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # TOML arrays arrive as lists


IntTuple = Annotated[tuple[int, ...], BeforeValidator(_list_as_tuple)]
FloatTriple = Annotated[tuple[float, float, float], BeforeValidator(_list_as_tuple)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Section(BaseModel):
    """A typed config section. Unknown keys are an error (checked with a 'did you mean').

    Strict: a value must have its key's type (``k = "8"``, ``normalize = "yes"`` and ``epochs =
    true`` are refused; an integer is accepted where a float is expected), and floats must be
    finite (``inf`` / ``nan`` are refused).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)

    @classmethod
    def retired(cls, key: str, data: dict[str, Any], where: str) -> str | None:
        """The error for ``key``, a key this section no longer reads (``data``: the section as given), or None."""
        return None
