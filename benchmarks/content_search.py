"""Which features the content index should hold: raw encoder features vs the CLEAR-projected ones.

On the sample catalog, whose hidden attributes are in ``sample_data/attributes.csv``, the index
stage is run twice on copies of a built work directory (``index.content_features = "raw"`` and
``"projected"``), and each content index is asked:

- ``similar``: every item's 10 nearest items by content; precision@10 = the share of them with the
  item's category (the attribute both modalities show), and with its material (text only) and its
  colour (image only);
- text search: one query per (material, category) pair, "<material> <category>" (e.g. "bamboo
  kite"); precision@10 of the category and of the material among the 10 hits.

    .venv/bin/clearrec run --config sample_data/clearrec.toml --workdir work
    .venv/bin/python benchmarks/content_search.py --config sample_data/clearrec.toml --workdir work
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from rich.console import Console

import clearrec
from clearrec.pipeline.config import load_config
from clearrec.pipeline.registry import STAGES
from clearrec.pipeline.runner import Runner

K = 10


def attributes(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["item_id"]: r for r in csv.DictReader(f)}


def precision(hits: list[str], want: str, attr: str, truth: dict[str, dict[str, str]]) -> float:
    return float(np.mean([truth[h][attr] == want for h in hits])) if hits else 0.0


def measure(workdir: Path, truth: dict[str, dict[str, str]]) -> dict[str, float]:
    rec = clearrec.open(workdir)
    items = [i for i in truth if i in rec.content.row_of]
    out: dict[str, float] = {}
    for attr in ("category", "material", "colour"):
        out[f"similar: {attr}"] = float(np.mean([
            precision([h.item_id for h in rec.similar(i, K)], truth[i][attr], attr, truth) for i in items]))
    pairs = sorted({(truth[i]["material"], truth[i]["category"]) for i in items})
    for attr, pos in (("category", 1), ("material", 0)):
        out[f"text search: {attr}"] = float(np.mean([
            precision([h.item_id for h in rec.search_text(f"{m} {c}", K)], (m, c)[pos], attr, truth)
            for m, c in pairs]))
    out["text queries"] = len(pairs)
    out["items"] = len(items)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="a work directory built by clearrec run")
    ap.add_argument("--attributes", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data" / "attributes.csv")
    a = ap.parse_args()
    truth = attributes(a.attributes)
    print(f"machine: {platform.machine()}; {date.today()}; work directory {a.workdir}")
    results = {}
    index = [s for s in STAGES if s.name == "index"]
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("raw", "projected"):
            copy = Path(tmp) / which
            shutil.copytree(a.workdir, copy, symlinks=True)
            cfg = load_config(a.config, [f"index.content_features={which}"])
            Runner(index, cfg, copy, console=Console(stderr=True, quiet=True)).run(force=True)
            results[which] = measure(copy, truth)
    names = [n for n in results["raw"] if n not in ("text queries", "items")]
    print(f"precision@{K} over {results['raw']['items']} items (similar) and {results['raw']['text queries']} "
          "text queries '<material> <category>':")
    print("| measure | raw | projected | raw / projected |")
    print("|---|---|---|---|")
    for n in names:
        r, p = results["raw"][n], results["projected"][n]
        print(f"| {n} | {r:.3f} | {p:.3f} | {r / p:.2f}x |" if p else f"| {n} | {r:.3f} | {p:.3f} | |")


if __name__ == "__main__":
    main()
