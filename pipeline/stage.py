"""What a stage is: a plain function plus declared inputs, outputs and config keys."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from rich.console import Console
from rich.text import Text

from .config import Config, ConfigView
from .store import ArtifactStore

if TYPE_CHECKING:
    from tqdm import tqdm

_CODE_VERSIONS: dict[tuple[str, tuple[str, ...]], str] = {}  # (stage module, declared modules) -> version


@dataclass
class StageContext:
    """What a stage's ``run`` gets: the store, the config (as run by the runner: a :class:`ConfigView` of
    the keys the stage declares), and a console."""

    store: ArtifactStore
    config: Config | ConfigView
    console: Console = field(default_factory=lambda: Console(stderr=True))

    def log(self, message: str) -> None:
        """Print ``message`` as it is (brackets in names and paths are text, never console markup)."""
        self.console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        """Print ``message`` after a highlighted "warning:" (the message itself as it is)."""
        self.console.print(Text.assemble(("warning: ", "bold yellow"), message), highlight=False)

    def progress(self, total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
        """A progress bar on stderr (rate shown in ``unit``/s)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


@dataclass
class StageResult:
    """What a stage returns: the artifacts it wrote and counts for the manifest."""

    outputs: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    summary: str | None = None  # one line printed after the stage


@dataclass(frozen=True)
class StageSpec:
    """A pipeline stage.

    - ``inputs``: work-directory artifacts it reads (absent optional ones are fingerprinted as absent);
    - ``outputs``: artifacts it may write (what it actually wrote is in its :class:`StageResult`);
      either may be a function of the config (the declared modalities name files), read with
      :meth:`inputs_for` / :meth:`outputs_for`;
    - ``config_keys``: dotted config keys (or whole sections) it reads: they enter its fingerprint;
    - ``external_inputs``: files outside the work directory it reads (raw catalog files);
    - ``code``: modules besides the stage's own whose source enters its code version.
    """

    name: str
    run: Callable[[StageContext], StageResult]
    inputs: tuple[str, ...] | Callable[[Config], tuple[str, ...]] = ()
    outputs: tuple[str, ...] | Callable[[Config], tuple[str, ...]] = ()
    config_keys: tuple[str, ...] = ()
    external_inputs: Callable[[Config], Iterable[Path]] | None = None
    code: tuple[str, ...] = ()
    description: str = ""

    def inputs_for(self, config: Config) -> tuple[str, ...]:
        return tuple(self.inputs(config) if callable(self.inputs) else self.inputs)

    def outputs_for(self, config: Config) -> tuple[str, ...]:
        return tuple(self.outputs(config) if callable(self.outputs) else self.outputs)

    def code_version(self) -> str:
        """Package version + hash of the stage module's and its declared modules' source.

        The source files are found with ``importlib.util.find_spec`` and read, not imported, so
        ``status`` costs no torch import. Computed once per process, so a source file edited
        during a long run neither changes the version midway nor breaks it.
        """
        key = (self.run.__module__, self.code)
        if key not in _CODE_VERSIONS:
            from .. import __version__

            h = hashlib.sha256(__version__.encode())
            for name in (self.run.__module__, *self.code):
                h.update(module_source(name).encode())
            _CODE_VERSIONS[key] = f"{__version__}+{h.hexdigest()[:16]}"
        return _CODE_VERSIONS[key]


def module_source(name: str) -> str:
    """The source text of module ``name`` as ``inspect.getsource`` gives it, without importing the module."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ImportError(f"no Python source file for module {name!r}")
    with tokenize.open(spec.origin) as f:  # decoded as Python reads it (coding cookie, universal newlines)
        text = f.read()
    return text if not text or text.endswith("\n") else text + "\n"
