"""The one exception hierarchy of clearrec (re-exported by ``clearrec.pipeline.errors``).

::

    ClearrecError                 base of everything raised on purpose
    ├── ConfigError               bad or unknown config key / value, missing config file
    ├── InputDataError            a raw input file cannot be used (names file, row, fix)
    ├── ArtifactError             a work-directory artifact is missing, corrupt or of the wrong schema
    │   └── IntegrityError        a checksum does not match the manifest (refuse to load)
    ├── EncoderUnavailableError   encoder weights cannot be had (names encoder + config key)
    ├── StageError                a stage failed; carries the stage name
    └── TrainingError             training diverged (NaN/inf loss) or cannot proceed

Every message says what to do next.
"""

from __future__ import annotations


class ClearrecError(Exception):
    """Base class of every error clearrec raises on purpose."""


class ConfigError(ClearrecError, ValueError):
    """The config file or an override is invalid."""


class InputDataError(ClearrecError, ValueError):
    """A raw input file cannot be used as given."""


class ArtifactError(ClearrecError):
    """An artifact in the work directory is missing, unreadable or has the wrong schema."""


class IntegrityError(ArtifactError):
    """An artifact's checksum does not match the one recorded in the manifest."""


class EncoderUnavailableError(ClearrecError, RuntimeError):
    """Encoder weights cannot be loaded (offline, wrong name, missing folder)."""


class StageError(ClearrecError, RuntimeError):
    """A stage failed."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


class TrainingError(ClearrecError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""
