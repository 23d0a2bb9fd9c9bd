"""The exception hierarchy, where users import it from (defined in :mod:`clearrec.models.errors`)."""

from __future__ import annotations

from ..models.errors import (
    ArtifactError,
    ClearrecError,
    ConfigError,
    EncoderUnavailableError,
    InputDataError,
    IntegrityError,
    StageError,
    TrainingError,
)

__all__ = [
    "ArtifactError",
    "ClearrecError",
    "ConfigError",
    "EncoderUnavailableError",
    "InputDataError",
    "IntegrityError",
    "StageError",
    "TrainingError",
]
