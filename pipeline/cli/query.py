"""``clearrec query``: recommendations, similar items, text or image search from a built index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import ConfigOpt, SetOpt, WorkdirOpt, console, load, out, workdir_of
from .main import app

if TYPE_CHECKING:
    from ..config import Config

MAX_K = 1000  # = pipeline.api.MAX_K (checked by a test), here so that --help does not import the index code
SOURCES = ("content", "cf")  # what --item neighbours are found by: features / item vectors

def load_for_queries(config: Path | None, workdir: Path | None, set_: list[str] | None) -> Config:
    """The run config; with only ``--workdir`` and no ./clearrec.toml, the defaults."""
    from ..config import DEFAULT_CONFIG_NAME, Config, parse_override

    if config is None and workdir is not None and not (Path.cwd() / DEFAULT_CONFIG_NAME).is_file():
        pairs = [(parse_override(s), s) for s in set_ or []]
        return Config().with_overrides({k: v for (k, v), _ in pairs}, origins={k: f"--set {s}" for (k, _), s in pairs})
    return load(config, set_)


@app.command()
def query(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    user: Annotated[Optional[str], typer.Option("--user", help="Recommend for this user id.")] = None,
    item: Annotated[Optional[str], typer.Option("--item", help="Items similar to this item id.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Search items by this text.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Search items by this image file.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=MAX_K, help="Number of results.")] = 20,
    source: Annotated[Optional[str], typer.Option("--source", metavar="content|cf", show_default=False,
                                                  help="For --item: 'content' (features, the default) or 'cf' "
                                                  "(item vectors).")] = None,
    include_seen: Annotated[bool, typer.Option("--include-seen", help="For --user: keep items the user "
                                               "already interacted with.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help='Print a JSON list of {"item_id", "score", "title"}.')] = False,
) -> None:
    """Query the built index: --user U | --item I | --text T | --image PATH."""
    given = {name: v for name, v in (("--user", user), ("--item", item), ("--text", text), ("--image", image))
             if v is not None}
    if len(given) != 1:
        raise typer.BadParameter(f"give exactly one of --user, --item, --text, --image (got {', '.join(given) or 'none'})")
    if source is not None and item is None:
        raise typer.BadParameter(f"--source applies to --item only (got it with {next(iter(given))})",
                                 param_hint="--source")
    if source is not None and source not in SOURCES:
        raise typer.BadParameter(f"{source!r} is not one of {', '.join(SOURCES)}", param_hint="--source")
    if text is not None and not text.strip():
        raise typer.BadParameter("the search text is empty; give some words, e.g. --text 'wooden toy'",
                                 param_hint="--text")
    from ..api import open_workdir

    cfg = load_for_queries(config, workdir, set_)
    rec = open_workdir(workdir_of(cfg, workdir, must_exist=True), omp_threads=cfg.index.serve.omp_threads or None,
                       max_image_pixels=cfg.encode.max_image_pixels)
    try:
        if user is not None:
            hits, what = rec.recommend(user, k, exclude_seen=not include_seen), f"recommendations for user {user}"
        elif item is not None:
            source = source or "content"
            hits, what = rec.similar(item, k, source=source), f"items similar to {item} ({source})"
        elif text is not None:
            hits, what = rec.search_text(text, k), f"text search: {text!r}"
        else:
            hits, what = rec.search_image(image, k), f"image search: {image}"
    except ValueError as e:  # e.g. an undecodable image
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False))
        return
    table = Table(title=escape(what))
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("score", justify="right")
    table.add_column("title")
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), escape(h.item_id), f"{h.score:.4f}", escape(h.title))
    out.print(table)
