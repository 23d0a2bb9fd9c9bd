"""Options and helpers shared by every subcommand."""

from __future__ import annotations

import logging
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer
from rich.console import Console

from ..errors import ClearrecError

if TYPE_CHECKING:
    from ..config import Config

# Library loggers whose records go to the run log instead of the console (with the root logger,
# which open_clip writes to).
THIRD_PARTY_LOGGERS = ("open_clip", "sentence_transformers", "transformers", "huggingface_hub", "faiss", "PIL")
RUN_LOG = "clearrec.log"  # in the work directory: third-party messages of every run, appended


def make_console(stderr: bool = False) -> Console:
    """A console that wraps and styles only on a terminal: a pipe or file gets each line whole, unstyled."""
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, soft_wrap=True, width=100_000, color_system=None, highlight=False)


console = make_console(stderr=True)
out = make_console()


def emit(text: str) -> None:
    """Write ``text`` to stdout as it is (for TOML, Markdown or JSON meant for a file or a pipe)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Run config (TOML). Default: ./clearrec.toml.", show_default=False),
]
WorkdirOpt = Annotated[
    Optional[Path],
    typer.Option("--workdir", "-w", help="Work directory. Default: the config's 'workdir' key.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                 help="Override one config key, e.g. --set train.lr=0.01 (repeatable)."),
]


def load(config: Path | None, overrides: list[str] | None) -> Config:
    from ..config import load_config

    return load_config(config, overrides or [])


def workdir_of(cfg: Config, workdir: Path | None, must_exist: bool = False) -> Path:
    """The work directory (``--workdir`` or the config's key), absolute.

    Raises :class:`ClearrecError` when the path is a file, and, with ``must_exist`` (the read-only
    commands, which create nothing), when the folder does not exist.
    """
    path = (workdir if workdir is not None else Path(cfg.workdir)).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ClearrecError(f"work directory {path} is a file, not a folder; pass --workdir with a folder")
    if must_exist and not path.is_dir():
        given = "--workdir" if workdir is not None else f"the config's workdir = {cfg.workdir!r}"
        raise ClearrecError(f"work directory {path} does not exist (from {given}); check the path, "
                            "or build it first with 'clearrec run'")
    return path


@contextmanager
def library_logs_to(path: Path) -> Iterator[None]:
    """Send the records of the root and third-party loggers (and Python warnings) to ``path`` while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in THIRD_PARTY_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    root_level = logging.getLogger().level
    logging.captureWarnings(True)
    try:
        for lg in loggers:
            lg.handlers = [handler]
            lg.propagate = False
        logging.getLogger().setLevel(logging.INFO)
        yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        logging.getLogger().setLevel(root_level)
        handler.close()


def resume_command(config: Path | None, workdir: Path | None, overrides: list[str] | None) -> str:
    """The ``clearrec run`` command line as given (quoted for a shell), for resume hints."""
    parts = ["clearrec", "run"]
    if config is not None:
        parts += ["--config", str(config)]
    if workdir is not None:
        parts += ["--workdir", str(workdir)]
    parts += [a for o in overrides or [] for a in ("--set", o)]
    return " ".join(shlex.quote(p) for p in parts)
