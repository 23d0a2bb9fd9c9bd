"""Options and helpers shared by every subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..config import Config, load_config

console = Console(stderr=True)
out = Console()

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
    typer.Option("--set", help="Override one config key, e.g. --set train.lr=0.01 (repeatable).", show_default=False),
]


def load(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


def workdir_of(cfg: Config, workdir: Path | None) -> Path:
    return (workdir if workdir is not None else Path(cfg.workdir)).expanduser().resolve()


def resume_command(config: Path | None, workdir: Path | None, overrides: list[str] | None) -> str:
    parts = ["clearrec run"]
    if config is not None:
        parts.append(f"--config {config}")
    if workdir is not None:
        parts.append(f"--workdir {workdir}")
    parts.extend(f"--set {o}" for o in overrides or [])
    return " ".join(parts)
