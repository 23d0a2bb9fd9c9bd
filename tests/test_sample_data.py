"""The bundled sample catalog: deterministic generator, planted structure, and ingest on it through
the Runner and the CLI (skip when up to date, rerun on config / source / output changes)."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from clearrec.pipeline.cli.main import app
from clearrec.pipeline.config import load_config
from clearrec.pipeline.registry import STAGES
from clearrec.pipeline.runner import Runner, select_stages

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
CONFIG = SAMPLE_DATA / "clearrec.toml"
DATA_FILES = ("items.csv", "interactions.csv", "attributes.csv")


def load_generator():
    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLE_DATA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the generator and the data -------------------------------------------------------------
@pytest.mark.slow
def test_generator_is_deterministic_and_matches_the_committed_files(tmp_path):
    gen = load_generator()
    gen.generate(tmp_path / "a")
    gen.generate(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == gen.N_ITEMS + len(DATA_FILES)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    for name in DATA_FILES:  # regenerate with: python sample_data/generate.py
        assert (tmp_path / "a" / name).read_bytes() == (SAMPLE_DATA / name).read_bytes(), name
    for rel in files[:: 40]:  # JPEG bytes may differ across libjpeg builds; pixels may not
        if rel.suffix == ".jpg":
            new = np.asarray(Image.open(tmp_path / "a" / rel), dtype=np.float64)
            old = np.asarray(Image.open(SAMPLE_DATA / rel), dtype=np.float64)
            assert np.abs(new - old).mean() < 2.0, rel


def test_sample_data_is_small_and_well_formed():
    items = pd.read_csv(SAMPLE_DATA / "items.csv", dtype=str, keep_default_na=False)
    inter = pd.read_csv(SAMPLE_DATA / "interactions.csv")
    assert 300 <= len(items) <= 500 and 5_000 <= len(inter) <= 15_000
    assert inter["timestamp"].between(1_704_067_200, 1_767_225_600).all()  # within 2024-2025
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert not inter.duplicated(["user_id", "item_id"]).any()
    assert inter.groupby("user_id").size().min() >= 5
    total = sum(p.stat().st_size for p in SAMPLE_DATA.rglob("*") if p.is_file() and "work" not in p.parts)
    assert total < 2_000_000
    for rel in items["image"]:
        with Image.open(SAMPLE_DATA / rel) as img:
            assert img.format == "JPEG" and img.size == (64, 64)


def test_planted_structure_splits_attributes_between_modalities():
    gen = load_generator()
    items = pd.read_csv(SAMPLE_DATA / "items.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(SAMPLE_DATA / "attributes.csv", dtype=str, keep_default_na=False)
    df = items.merge(truth, on="item_id")
    text = (df["title"] + " " + df["description"]).str.lower()
    for _, row in df.iterrows():  # coarse category: in the title; material / brand: in the text only
        assert gen.CATEGORIES[row["category"]][1] in row["title"].lower()
        assert row["material"] in text[_] and row["brand"].lower() in text[_]
    image_only = [*gen.COLOURS, *gen.PATTERNS, "striped", "dotted", "checked"]
    assert not text.str.contains("|".join(rf"\b{w}\b" for w in image_only)).any()
    # colour is drawn: the centre pixel is nearest to the item's planted colour for most items
    palette = np.array(list(gen.COLOURS.values()), dtype=np.float64)
    hits = 0
    for _, row in df.iterrows():
        img = np.asarray(Image.open(SAMPLE_DATA / row["image"]).convert("RGB"), dtype=np.float64)
        centre = img[28:36, 28:36].reshape(-1, 3).mean(axis=0)
        dark, light = palette * 0.55, palette + (255 - palette) * 0.6  # pattern shades
        dist = np.minimum(np.minimum(np.linalg.norm(palette - centre, axis=1), np.linalg.norm(dark - centre, axis=1)),
                          np.linalg.norm(light - centre, axis=1))
        hits += list(gen.COLOURS)[int(dist.argmin())] == row["colour"]
    assert hits / len(df) > 0.8


def test_user_preferences_follow_the_fine_attributes():
    truth = pd.read_csv(SAMPLE_DATA / "attributes.csv", dtype=str)
    inter = pd.read_csv(SAMPLE_DATA / "interactions.csv", dtype={"item_id": str})
    rng = np.random.default_rng(0)
    shuffled = inter.assign(item_id=rng.permutation(inter["item_id"].to_numpy()))

    def top_share(df: pd.DataFrame, attr: str, top: int) -> float:
        """Mean share of a user's interactions on their `top` most frequent values of `attr`."""
        merged = df.merge(truth, on="item_id")
        counts = np.sort(pd.crosstab(merged["user_id"], merged[attr]).to_numpy(), axis=1)[:, ::-1]  # (users, values)
        return float((counts[:, :top].sum(axis=1) / counts.sum(axis=1)).mean())

    for attr, top in (("colour", 2), ("pattern", 1), ("material", 2), ("brand", 1)):
        assert top_share(inter, attr, top) > top_share(shuffled, attr, top) + 0.12, attr


# ---- ingest on the sample through the Runner and the CLI --------------------------------------
@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """The sample's config and CSV files copied, so a test may edit them."""
    for name in ("clearrec.toml", "items.csv", "interactions.csv"):
        shutil.copy(SAMPLE_DATA / name, tmp_path / name)
    return tmp_path / "clearrec.toml"


def runner_for(config_path: Path, workdir: Path, **overrides) -> tuple[Runner, io.StringIO]:
    log = io.StringIO()
    cfg = load_config(config_path).with_overrides(overrides)
    return Runner(STAGES, cfg, workdir, console=Console(file=log, width=300)), log


def test_runner_skips_when_up_to_date_and_reruns_on_change(sample_copy, tmp_path):
    work = tmp_path / "work"
    only = select_stages(STAGES, ["ingest"])
    runner, log = runner_for(sample_copy, work)
    assert runner.run(only) == ["ingest"]
    manifest = json.loads((work / "manifest.json").read_text())["stages"]["ingest"]
    counts = manifest["counts"]
    assert manifest["status"] == "ok" and counts["interactions_read"] == len(pd.read_csv(tmp_path / "interactions.csv"))
    assert counts["items_read"] == len(pd.read_csv(tmp_path / "items.csv"))
    assert manifest["outputs"]["items.parquet"]["rows"] == counts["items_accepted"]
    assert set(manifest["parts"]["external"]) == {str(tmp_path / "items.csv"), str(tmp_path / "interactions.csv")}
    read_line = (f"items: {counts['items_read']:,} read = {counts['items_accepted']:,} accepted "
                 f"+ {counts['items_rejected']:,} rejected")
    assert read_line in log.getvalue()

    runner, log = runner_for(sample_copy, work)
    assert runner.run(only) == [] and "Nothing to do" in log.getvalue()

    runner, _ = runner_for(sample_copy, work, **{"ingest.seed": 7})
    assert runner.status()["ingest"].reason == "config changed: ingest.seed"
    assert runner.run(only) == ["ingest"]

    with open(tmp_path / "interactions.csv", "a") as f:
        f.write("U0001,P0002,1704067300,5\n")
    runner, _ = runner_for(sample_copy, work, **{"ingest.seed": 7})
    state = runner.status()["ingest"]
    assert state.state == "stale" and state.reason.startswith("source file changed")
    assert "interactions.csv" in state.reason
    assert runner.run(only) == ["ingest"]


def test_cli_runs_ingest_skips_reruns_and_notices_corruption(tmp_path):
    cli = CliRunner()
    base = ["--config", str(CONFIG), "--workdir", str(tmp_path / "w")]
    first = cli.invoke(app, ["run", *base, "--only", "ingest"])
    assert first.exit_code == 0, first.output
    assert "✓ ingest" in first.output and "interactions: 10,737 read = " in first.output

    second = cli.invoke(app, ["run", *base, "--only", "ingest"])
    assert "Nothing to do" in second.output and "✓ ingest" not in second.output

    changed = cli.invoke(app, ["run", *base, "--only", "ingest", "--set", "ingest.seed=7"])
    assert "config changed: ingest.seed" in changed.output and "✓ ingest" in changed.output

    items = tmp_path / "w" / "items.parquet"
    items.write_bytes(items.read_bytes()[:-10] + b"corrupted!")
    status = cli.invoke(app, ["status", *base, "--set", "ingest.seed=7", "--json"])
    assert json.loads(status.stdout)["ingest"] == {"state": "stale", "reason": "output items.parquet was modified"}
    again = cli.invoke(app, ["run", *base, "--only", "ingest", "--set", "ingest.seed=7"])
    assert "output items.parquet was modified" in again.output and "✓ ingest" in again.output
    status = cli.invoke(app, ["status", *base, "--set", "ingest.seed=7", "--json"])
    assert json.loads(status.stdout)["ingest"]["state"] == "up-to-date"


@pytest.mark.slow
def test_clearrec_command_runs_the_sample_config(tmp_path):
    exe = Path(sys.executable).with_name("clearrec")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    cmd = [str(exe), "run", "--config", str(CONFIG), "--workdir", str(tmp_path / "w"), "--only", "ingest"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "✓ ingest" in done.stderr and "interactions: 10,737 read = " in done.stderr
    assert (tmp_path / "w" / "interactions.parquet").is_file()
