"""``clearrec compare``, ``clearrec ablate``, ``clearrec sweep`` and ``clearrec report``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..errors import ClearrecError, ConfigError
from .common import ConfigOpt, SetOpt, WorkdirOpt, console, emit, load, workdir_of
from .main import app

if TYPE_CHECKING:
    from ..experiments import Harness

OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Experiment folder (tables + runs/). Default: <workdir>/experiments.", show_default=False)]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Comma-separated training seeds, e.g. 0,1,2.")]
EpochsOpt = Annotated[Optional[int], typer.Option(
    "--epochs", help="Cap train.epochs (quick runs); default: the config's value.", show_default=False)]


def _list(text: str, kind: type, what: str) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from e


def _setup(config: Path | None, workdir: Path | None, set_: list[str] | None, out_dir: Path | None,
           command: str) -> Harness:
    from ..experiments import Harness

    cfg = load(config, set_)
    base = workdir_of(cfg, workdir)
    folder = (out_dir if out_dir is not None else base / "experiments").expanduser().resolve()
    console.print(f"base work directory: {base}\nexperiment folder: {folder}", markup=False)
    return Harness(cfg, base, folder, console=console, command=command)


def _command(name: str, config: Path | None, workdir: Path | None, set_: list[str] | None,
             out_dir: Path | None, **options: Any) -> str:
    parts = ["clearrec", name]
    for flag, value in (("--config", config), ("--workdir", workdir), ("--out", out_dir)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [a for o in set_ or [] for a in ("--set", o)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [a for v in value for a in (flag, str(v))]
        elif value not in (None, False):
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _backbones(text: str) -> list[str]:
    """``--backbones``: a comma-separated list, or ``all`` for every registered backbone."""
    from ..experiments import backbone_names

    names = _list(text, str, "--backbones")
    return list(backbone_names()) if [n.strip() for n in names] == ["all"] else [n.strip() for n in names]


def _grid(params: list[str] | None) -> dict[str, list[Any]]:
    from ..config import parse_override

    grid: dict[str, list[Any]] = {}
    for item in params or []:
        key, raw = item.split("=", 1) if "=" in item else (item, "")
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid-param {item!r} must look like key=v1,v2 (e.g. train.vbpr.reg=1e-2,1e-4)")
        grid[key.strip()] = values
    return grid


@app.command()
def compare(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    out_dir: OutOpt = None,
    backbones: Annotated[str, typer.Option(
        "--backbones", help="Comma-separated backbones, or 'all' (every registered backbone).",
    )] = "lightgcn,vbpr,freedom",
    seeds: SeedsOpt = "0,1,2",
    epochs: EpochsOpt = None,
    grid: Annotated[bool, typer.Option(
        "--grid", help="Expand each backbone's reference hyperparameter grid (the values its reference "
        "implementation searches: e.g. 20 points for lightgcn, 3 for mgcn, none for lgmrec) into runs, each point "
        "x seeds x CLEAR off/on; the point with the best mean valid Recall@20 is chosen per backbone and CLEAR "
        "setting, and its test metrics reported.")] = False,
    grid_param: Annotated[Optional[list[str]], typer.Option(
        "--grid-param", help="A grid key, e.g. train.vbpr.reg=1e-2,1e-4 (repeatable; train.<backbone>.* "
        "keys apply to that backbone only; with --grid it replaces that key's reference values).",
        show_default=False)] = None,
    ablations: Annotated[bool, typer.Option("--ablations", help="Also run the CLEAR ablations.")] = False,
    ablation_backbone: Annotated[str, typer.Option(
        "--ablation-backbone", help="Backbone of the ablations.")] = "freedom",
) -> None:
    """Train backbones with CLEAR off and on over seeds (features encoded once); table of test metrics."""
    cmd = _command("compare", config, workdir, set_, out_dir, backbones=backbones, seeds=seeds, epochs=epochs,
                   grid=grid, grid_param=grid_param, ablations=ablations,
                   ablation_backbone=ablation_backbone if ablations else None)
    h = _setup(config, workdir, set_, out_dir, cmd)
    h.compare(_backbones(backbones), _list(seeds, int, "--seeds"), epochs, _grid(grid_param), grid)
    emit((h.out.root / "compare.md").read_text(encoding="utf-8"))
    if ablations:
        h.ablate(ablation_backbone, _list(seeds, int, "--seeds"), epochs)
        emit((h.out.root / "ablations.md").read_text(encoding="utf-8"))
    console.print(f"wrote {h.out.root / 'compare.json'}; HTML: clearrec report --comparison {h.out.root}", markup=False)


@app.command()
def ablate(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    out_dir: OutOpt = None,
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone to ablate.")] = "freedom",
    seeds: SeedsOpt = "0,1,2",
    epochs: EpochsOpt = None,
) -> None:
    """CLEAR ablations: hard vs soft, static vs dynamic, one modality only, random-directions control."""
    cmd = _command("ablate", config, workdir, set_, out_dir, backbone=backbone, seeds=seeds, epochs=epochs)
    h = _setup(config, workdir, set_, out_dir, cmd)
    h.ablate(backbone, _list(seeds, int, "--seeds"), epochs)
    emit((h.out.root / "ablations.md").read_text(encoding="utf-8"))


@app.command()
def sweep(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    out_dir: OutOpt = None,
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone to sweep.")] = "freedom",
    k: Annotated[str, typer.Option("--k", help="Comma-separated ranks k.")] = "2,4,8,16",
    strength: Annotated[str, typer.Option("--strength", help="Comma-separated lambdas.")] = "0.5,1.0",
    ratio: Annotated[str, typer.Option("--ratio", help="Comma-separated energy ratios ('' for none).")] = "0.5,0.9",
    seeds: SeedsOpt = "0",
    epochs: EpochsOpt = None,
) -> None:
    """Grid over CLEAR's k and lambda (and energy ratio) for one backbone; heatmap of valid Recall@20."""
    cmd = _command("sweep", config, workdir, set_, out_dir, backbone=backbone, k=k, strength=strength,
                   ratio=ratio, seeds=seeds, epochs=epochs)
    h = _setup(config, workdir, set_, out_dir, cmd)
    h.sweep(backbone, _list(k, int, "--k"), _list(strength, float, "--strength"), _list(ratio, float, "--ratio"),
            _list(seeds, int, "--seeds"), epochs)
    emit((h.out.root / "sweep.md").read_text(encoding="utf-8"))


@app.command()
def report(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    comparison: Annotated[Optional[Path], typer.Option(
        "--comparison", help="Report on an experiment folder (compare / ablate / sweep output) instead.",
        show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for report.html + report.md. Default: the reported folder.",
        show_default=False)] = None,
) -> None:
    """Write report.html (self-contained) and report.md for a work directory or an experiment folder."""
    from ..report import write_report

    if comparison is not None:
        root = comparison
    elif workdir is not None:
        root = workdir
    else:
        root = workdir_of(load(config, set_), None)
    if root.exists() and not root.is_dir():
        what = "experiment folder" if comparison is not None else "work directory"
        raise ClearrecError(f"{what} {root} is a file, not a folder; pass a folder")
    html_path, md_path = write_report(root, comparison=comparison is not None, out_dir=out_dir)
    emit(f"{html_path}\n{md_path}")
