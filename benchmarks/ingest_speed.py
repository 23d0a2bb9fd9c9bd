"""Ingest stage wall time, against the bare parse of the same raw files.

Cases (each timed ``--repeat`` times, the minimum kept; ingest and bare parse alternate):

- ``amazon-baby``: the split-json importer on ../shared/datasets/amazon-baby (split given);
  bare = ``json.load`` of its five JSON files;
- ``sample``: the bundled sample catalog (CSV, k-core 5, random split); bare = ``pandas.read_csv``
  of items.csv and interactions.csv (all columns as strings);
- ``csv-N``: a synthetic CSV catalog with N interactions (``--rows``), written to a temporary
  folder; bare = ``pandas.read_csv`` of both files.

"ingest" is ``stages.ingest.run`` on a fresh work directory: read, validate, dedupe, k-core,
split, write the four Parquet files. Peak memory: a fresh subprocess per case runs ingest (or the
bare parse) once and reports its ``VmHWM`` minus its ``VmRSS`` before the call, printed against the
raw files' size on disk.

    .venv/bin/python benchmarks/ingest_speed.py
    .venv/bin/python benchmarks/ingest_speed.py --rows 200000 --repeat 2
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w
from rich.console import Console

from clearrec.pipeline.config import load_config
from clearrec.pipeline.stage import StageContext
from clearrec.pipeline.store import ArtifactStore
from clearrec.stages import ingest

REPO = Path(__file__).resolve().parents[1]
AMAZON_BABY = REPO.parent / "shared" / "datasets" / "amazon-baby"


def time_ingest(config_path: Path, scratch: Path) -> tuple[float, dict]:
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    ctx = StageContext(store=ArtifactStore(work), config=load_config(config_path), console=Console(file=io.StringIO()))
    t0 = time.perf_counter()
    result = ingest.run(ctx)
    return time.perf_counter() - t0, result.counts


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(config_path: Path, bare: bool) -> None:
    """(In a subprocess) print the memory one ingest run (or bare parse) adds at its peak, in bytes."""
    config = load_config(config_path)
    scratch = Path(tempfile.mkdtemp())
    before = _proc_kib("VmRSS")
    if bare:
        BARE[config.ingest.format](config)
    else:
        ingest.run(StageContext(store=ArtifactStore(scratch / "work"), config=config,
                                console=Console(file=io.StringIO())))
    print((_proc_kib("VmHWM") - before) * 1024)
    shutil.rmtree(scratch, ignore_errors=True)


def peak_bytes(config_path: Path, bare: bool) -> int:
    args = [sys.executable, __file__, "--peak-child", str(config_path)] + (["--bare"] if bare else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


SPLIT_JSON_FILES = ["train.json", "val.json", "test.json", "item2id.json", "user2id.json"]
BARE = {  # format -> bare parse of the raw files of that config
    "split-json": lambda cfg: [json.loads((cfg.resolve(cfg.ingest.interactions) / n).read_text())
                               for n in SPLIT_JSON_FILES],
    "table": lambda cfg: [pd.read_csv(cfg.resolve(p), dtype=str) for p in (cfg.ingest.items, cfg.ingest.interactions)],
}


def raw_bytes(config_path: Path) -> int:
    cfg = load_config(config_path)
    if cfg.ingest.format == "split-json":
        return sum((cfg.resolve(cfg.ingest.interactions) / n).stat().st_size for n in SPLIT_JSON_FILES)
    return sum(cfg.resolve(p).stat().st_size for p in (cfg.ingest.items, cfg.ingest.interactions))


def synthetic_csv(folder: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_items, n_users = max(rows // 20, 10), max(rows // 15, 10)
    items = pd.DataFrame({"item_id": [f"I{j}" for j in range(n_items)],
                          "title": [f"Item number {j}" for j in range(n_items)],
                          "description": "A thing you may like.",
                          "image": [f"images/I{j}.jpg" for j in range(n_items)]})
    items.to_csv(folder / "items.csv", index=False)
    inter = pd.DataFrame({"user_id": np.char.add("U", rng.integers(0, n_users, rows).astype(str)),
                          "item_id": np.char.add("I", (rng.zipf(1.3, rows) % n_items).astype(str)),
                          "timestamp": rng.integers(1_600_000_000, 1_700_000_000, rows),
                          "rating": rng.integers(1, 6, rows)})
    inter.to_csv(folder / "interactions.csv", index=False)


def run_case(name: str, config_path: Path, scratch: Path, repeat: int) -> None:
    cfg = load_config(config_path)
    bare = partial(BARE[cfg.ingest.format], cfg)
    ingest_s, bare_s = [], []
    counts: dict = {}
    for _ in range(repeat):
        seconds, counts = time_ingest(config_path, scratch)
        ingest_s.append(seconds)
        bare_s.append(time_call(bare))
    n = counts["interactions_read"]
    best, base = min(ingest_s), min(bare_s)
    print(f"{name:<12} {n:>10,} rows  ingest {best:7.2f} s  ({n / best:>10,.0f} rows/s)  "
          f"bare parse {base:6.2f} s  ratio {best / base:5.1f}x  "
          f"accepted {counts['interactions_accepted']:,} rejected {counts['interactions_rejected']:,}")
    size = raw_bytes(config_path)
    peak, peak_bare = peak_bytes(config_path, bare=False), peak_bytes(config_path, bare=True)
    print(f"{'':<12} raw files {size / 2**20:8.1f} MiB  peak memory: ingest {peak / 2**20:8.1f} MiB "
          f"({peak / size:4.1f}x the files)  bare parse {peak_bare / 2**20:8.1f} MiB ({peak_bare / size:4.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="interactions in the synthetic CSV case")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.bare)
        return
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if (AMAZON_BABY / "train.json").is_file():
            cfg = scratch / "baby.toml"
            cfg.write_text(tomli_w.dumps({"ingest": {"format": "split-json", "interactions": str(AMAZON_BABY),
                                                     "split": "given"}}))
            run_case("amazon-baby", cfg, scratch, args.repeat)
        run_case("sample", REPO / "sample_data" / "clearrec.toml", scratch, args.repeat)
        data = scratch / "csv"
        data.mkdir()
        synthetic_csv(data, args.rows)
        cfg = data / "clearrec.toml"
        cfg.write_text(tomli_w.dumps({"ingest": {"items": "items.csv", "interactions": "interactions.csv",
                                                 "kcore": 5, "split": "random"}}))
        run_case(f"csv-{args.rows:,}", cfg, scratch, args.repeat)


if __name__ == "__main__":
    main()
