"""``clearrec`` subcommands: run, status, config show, and one shortcut per stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ClearrecError, ConfigError
from ..registry import STAGES, stage_names
from ..runner import Runner, select_stages
from .common import ConfigOpt, SetOpt, WorkdirOpt, console, load, out, resume_command, workdir_of

app = typer.Typer(
    name="clearrec",
    help=(
        "clearrec: raw multimodal catalog -> features -> CLEAR projection -> graph recommender -> FAISS index.\n\n"
        f"Stages, in order: {' -> '.join(stage_names())}. Start with "
        "'clearrec run --config sample_data/clearrec.toml', then 'clearrec status'."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the run config.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def run(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only these stages (repeat or comma-separate).")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Run from this stage to the end.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Run up to and including this stage.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun selected stages even if up to date.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would run, run nothing.")] = False,
) -> None:
    """Run the pipeline (every stage whose inputs, config or code changed)."""
    cfg = load(config, set_)
    selected = select_stages(STAGES, only, from_, to)
    runner = Runner(STAGES, cfg, workdir_of(cfg, workdir), console=console)
    console.print(f"work directory: {escape(str(runner.store.root))}")
    runner.run(selected, force=force, dry_run=dry_run, resume_hint=resume_command(config, workdir, set_))


@app.command()
def status(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: {stage: {state, reason}}.")] = False,
) -> None:
    """Show each stage as up-to-date, stale (with the reason) or never-run."""
    cfg = load(config, set_)
    states = Runner(STAGES, cfg, workdir_of(cfg, workdir), console=console).status()
    if as_json:
        out.print_json(json.dumps({n: {"state": s.state, "reason": s.reason} for n, s in states.items()}))
        return
    table = Table(title=f"clearrec status: {escape(str(workdir_of(cfg, workdir)))}")
    table.add_column("stage")
    table.add_column("state")
    table.add_column("reason")
    colour = {"up-to-date": "green", "stale": "yellow", "never-run": "red"}
    for name, s in states.items():
        table.add_row(name, f"[{colour[s.state]}]{s.state}[/]", escape(s.reason))
    out.print(table)


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as TOML."""
    cfg = load(config, set_)
    out.print(f"# resolved from {cfg.source}; relative paths are relative to {cfg.base_dir}", highlight=False, markup=False)
    out.print(cfg.to_toml(), highlight=False, markup=False)


def _stage_command(name: str, help_text: str):
    def command(
        config: ConfigOpt = None,
        workdir: WorkdirOpt = None,
        set_: SetOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Rerun even if up to date.")] = False,
    ) -> None:
        cfg = load(config, set_)
        runner = Runner(STAGES, cfg, workdir_of(cfg, workdir), console=console)
        runner.run(select_stages(STAGES, [name]), force=force, resume_hint=resume_command(config, workdir, set_))

    command.__doc__ = f"Run only the '{name}' stage: {help_text} (same as 'clearrec run --only {name}')."
    return command


for _spec in STAGES:
    app.command(name=_spec.name)(_stage_command(_spec.name, _spec.description))


def main() -> None:
    try:
        app()
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {escape(str(e))}")
        sys.exit(2)
    except ClearrecError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(1)
