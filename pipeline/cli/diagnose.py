"""``clearrec diagnose``: CLEAR diagnostics measured from a work directory's features before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import ConfigOpt, SetOpt, WorkdirOpt, console, load, out, workdir_of
from .main import app


@app.command()
def diagnose(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for diagnostics.json and the PNGs. "
                                                    "Default: <workdir>/diagnose.", show_default=False)] = None,
    overlap_k: Annotated[Optional[int], typer.Option("--overlap-k", min=1, help="K of the top-K overlap. "
                                                     "Default: project.overlap_k.", show_default=False)] = None,
    items: Annotated[Optional[int], typer.Option("--items", min=2, help="Items sampled for overlap and scores. "
                                                 "Default: project.diagnostics_items.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnostics as JSON.")] = False,
) -> None:
    """Measure CLEAR's effect from features/*.parquet vs features/*_clear.parquet (spectra, overlap, variance)."""
    from ...stages.project import diagnose as measure
    from ...stages.project import summary_line
    from ..store import ArtifactStore

    cfg = load(config, set_)
    store = ArtifactStore(workdir_of(cfg, workdir))
    target = ArtifactStore(out_dir if out_dir is not None else store.root / "diagnose")
    diag, pngs = measure(store, cfg, target, overlap_k=overlap_k, items=items)
    console.print(f"wrote {target.path('diagnostics.json')} and {len(pngs)} figure(s) in {target.root}", markup=False)
    if as_json:
        out.print_json(json.dumps(diag))
        return
    table = Table(title=f"CLEAR diagnostics: {escape(str(store.root))}")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    top_b, top_a = diag["top_singular_values"]["before"], diag["top_singular_values"]["after"]
    table.add_row("largest singular value", f"{top_b[0]:.4g}", f"{top_a[0]:.4g}")
    table.add_row(f"sum of top-{len(top_b)} singular values", f"{sum(top_b):.4g}", f"{sum(top_a):.4g}")
    key = next((k for k in diag if k.startswith("overlap@")), None)
    if key:
        table.add_row(f"image/text {key}", f"{diag[key]['before']:.4f}", f"{diag[key]['after']:.4f}")
    for m, v in diag["variance_kept"].items():
        table.add_row(f"{m} variance kept", "100%", "n/a" if v is None else f"{v:.1%}")
    out.print(table)
    out.print(summary_line(diag), highlight=False)
