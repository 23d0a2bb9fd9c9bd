"""``clearrec`` subcommands: run, status, config show, and one shortcut per stage."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ClearrecError, ConfigError
from ..registry import DESCRIPTIONS, stage_names
from .common import (
    RUN_LOG, ConfigOpt, SetOpt, WorkdirOpt, console, emit, library_logs_to, load, out, resume_command,
    workdir_of,
)
from .summary import run_summary

STAGE_LIST = ", ".join(stage_names())


class _FlagHelp:
    """Shows every flag (``--force``, ``-h`` / ``--help``) without a value placeholder in the rich help."""

    def get_params(self, ctx):  # type: ignore[no-untyped-def]
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


class _App(typer.Typer):
    """A Typer app whose commands are :class:`_Command` (here and in the other cli modules)."""

    def command(self, *args, cls=None, **kwargs):  # type: ignore[no-untyped-def,override]
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    name="clearrec",
    help=(
        "clearrec: raw multimodal catalog -> features -> CLEAR projection -> graph recommender -> FAISS index.\n\n"
        f"Stages, in order: {' -> '.join(stage_names())}. Start with "
        "'clearrec run --config sample_data/clearrec.toml', then "
        "'clearrec status --config sample_data/clearrec.toml'."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = _App(cls=_Group, help="Inspect the run config.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _print_version(value: bool) -> None:
    if value:
        from ... import __version__

        emit(f"clearrec {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    """clearrec: raw multimodal catalog -> features -> CLEAR projection -> graph recommender -> FAISS index."""


@app.command()
def run(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    only: Annotated[Optional[list[str]], typer.Option(
        "--only", metavar="STAGE", help=f"Run only these stages (repeat or comma-separate): {STAGE_LIST}.")] = None,
    from_: Annotated[Optional[str], typer.Option(
        "--from", metavar="STAGE", help=f"Run from this stage to the end: {STAGE_LIST}.")] = None,
    to: Annotated[Optional[str], typer.Option(
        "--to", metavar="STAGE", help=f"Run up to and including this stage: {STAGE_LIST}.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun selected stages even if up to date.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would run, run nothing.")] = False,
) -> None:
    """Run the pipeline (every stage whose inputs, config or code changed)."""
    from ..registry import STAGES
    from ..runner import Runner, select_stages

    cfg = load(config, set_)
    selected = select_stages(STAGES, only, from_, to)
    root = workdir_of(cfg, workdir)
    runner = Runner(STAGES, cfg, root, console=console)
    console.print(f"work directory: {escape(str(runner.store.root))}")
    with library_logs_to(root / RUN_LOG):
        runner.run(selected, force=force, dry_run=dry_run, resume_hint=resume_command(config, workdir, set_))
    if not dry_run:
        console.print("\n".join(run_summary(root, stage_names(), config)), markup=False, highlight=False)


@app.command()
def status(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: {stage: {state, reason}}.")] = False,
) -> None:
    """Show each stage as up-to-date, stale (with the reason) or never-run."""
    from ..registry import STAGES
    from ..runner import Runner

    cfg = load(config, set_)
    root = workdir_of(cfg, workdir, must_exist=True)
    states = Runner(STAGES, cfg, root, console=console).status()
    if as_json:
        emit(json.dumps({n: {"state": s.state, "reason": s.reason} for n, s in states.items()}, indent=2))
        return
    table = Table(title=f"clearrec status: {escape(str(root))}")
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
    emit(f"# resolved from {cfg.source}; relative paths are relative to {cfg.base_dir}\n{cfg.to_toml()}")


def _stage_command(name: str, help_text: str):
    def command(
        config: ConfigOpt = None,
        workdir: WorkdirOpt = None,
        set_: SetOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Rerun even if up to date.")] = False,
    ) -> None:
        from ..registry import STAGES
        from ..runner import Runner, select_stages

        cfg = load(config, set_)
        root = workdir_of(cfg, workdir)
        runner = Runner(STAGES, cfg, root, console=console)
        with library_logs_to(root / RUN_LOG):
            runner.run(select_stages(STAGES, [name]), force=force, resume_hint=resume_command(config, workdir, set_))

    command.__doc__ = f"Run only the '{name}' stage: {help_text} (same as 'clearrec run --only {name}')."
    return command


for _name, _description in DESCRIPTIONS.items():
    app.command(name=_name)(_stage_command(_name, _description))


def main() -> None:
    try:
        app()
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except ClearrecError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(1)
