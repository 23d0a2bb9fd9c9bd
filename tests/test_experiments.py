"""Experiment harness: compare / ablate / sweep, run-directory reuse, noise rule, report of a comparison.

The first group drives the harness with a toy four-stage pipeline whose "training" returns
known metrics, so the bookkeeping (linking, adoption, resume, selection on valid, tables) is
checked exactly and fast. The second group runs the real stages on sample_data at tiny sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from clearrec.pipeline.config import ProjectConfig, load_config
from clearrec.pipeline.errors import ConfigError, TrainingError
from clearrec.pipeline.experiment_tables import NOISE_EXPLAINED
from clearrec.pipeline.experiments import (
    NOISE_RULE,
    TABLE_METRICS,
    Harness,
    ablations,
    backbone_grid,
    backbone_names,
    featureless,
    grid_points,
    noise_check,
)
from clearrec.pipeline.report import write_report
from clearrec.pipeline.stage import StageResult, StageSpec
from clearrec.pipeline.store import ArtifactStore
from clearrec.pipeline.workdir import declared_modalities
from conftest import SAMPLE_DATA
from report_checks import raw_dumps
from typer.testing import CliRunner

CALLS: Counter = Counter()


# ---- a toy pipeline with the real stage names ----------------------------------------------
def _ingest(ctx):
    CALLS["ingest"] += 1
    ctx.store.write_parquet("items.parquet", pa.table({"item_idx": [0, 1, 2], "item_id": ["a", "b", "c"]}))
    return StageResult(["items.parquet"], counts={"items": 3})


def _encode(ctx):
    CALLS["encode"] += 1
    ctx.store.write_json("features/text.json", {"dim": 4, "items": ctx.store.checksum("items.parquet")})
    return StageResult(["features/text.json"])


def _project(ctx):
    CALLS["project"] += 1
    p = ctx.config.project
    ctx.store.write_json("clear/projector.json", {"k": p.k if p.ratio is None else 3, "strength": p.strength,
                                                  "enabled": p.enabled, "options": ctx.config.get("project")})
    return StageResult(["clear/projector.json"])


def _train(ctx):
    """valid/test metrics are known functions of the settings (test deliberately disagrees on the grid)."""
    CALLS["train"] += 1
    t = ctx.config.train
    if t.seed == 13:
        raise TrainingError("loss became NaN")
    if featureless(t.backbone):
        assert not ctx.store.exists("clear/projector.json")  # no project stage for a backbone without features
        clear = 0.0
    else:
        proj = ctx.store.read_json("clear/projector.json")
        clear = 0.0 if not proj["enabled"] else 0.02 * proj["strength"] + 0.001 * proj["k"]
    noise = 0.001 * t.seed
    valid = 0.10 + clear + noise + (0.05 if t.vbpr.reg == 1e-2 else 0.0)  # the grid point reg=1e-2 wins on valid
    test = 0.10 + clear + noise + (0.05 if t.vbpr.reg == 1e-3 else 0.0)  # ... but reg=1e-3 would win on test
    metrics = {"valid": {"recall@20": valid}, "test": {m: test for m in TABLE_METRICS}, "best_epoch": t.epochs}
    ctx.store.write_json("model/metrics.json", metrics)
    return StageResult(["model/metrics.json"])


TOY = [
    StageSpec("ingest", _ingest, outputs=("items.parquet",), config_keys=("ingest.seed",)),
    StageSpec("encode", _encode, inputs=("items.parquet",), outputs=("features/text.json",), config_keys=("encode",)),
    StageSpec("project", _project, inputs=("features/text.json",), outputs=("clear/projector.json",),
              config_keys=("project",)),
    StageSpec("train", _train, inputs=("clear/projector.json",), outputs=("model/metrics.json",),
              config_keys=("train",)),
]


@pytest.fixture
def toy(tmp_path):
    CALLS.clear()
    cfg = load_config(_write_config(tmp_path))
    return Harness(cfg, tmp_path / "base", tmp_path / "exp", stages=TOY, command="clearrec compare (test)")


def _write_config(folder: Path) -> Path:
    path = folder / "clearrec.toml"
    path.write_text('[train]\nepochs = 2\n[project]\nk = 4\n', encoding="utf-8")
    return path


# ---- statistics --------------------------------------------------------------------------
def test_noise_check_rule():
    off, on = {0: 0.10, 1: 0.12, 2: 0.11}, {0: 0.13, 1: 0.15, 2: 0.14}
    d = noise_check(off, on)
    assert d["diff"] == pytest.approx(0.03)
    assert d["rel"] == pytest.approx(0.03 / 0.11)
    assert d["se"] == pytest.approx((0.01**2 / 3 + 0.01**2 / 3) ** 0.5)
    assert d["exceeds_noise"] is True
    small = noise_check(off, {0: 0.105, 1: 0.125, 2: 0.10})
    assert small["exceeds_noise"] is False and 0 < small["p_paired"] <= 1
    one = noise_check({0: 0.1}, {0: 0.2})
    assert one["exceeds_noise"] is None and one["se"] is None and one["diff"] == pytest.approx(0.1)
    assert "2 * SE" in NOISE_RULE


def test_grid_points_per_backbone():
    assert grid_points("lightgcn", None, False) == [{}]
    given = {"train.freedom.dropout": [0.8, 0.9], "train.bm3.layers": [2], "train.lr": [1e-3, 1e-2]}
    pts = grid_points("vbpr", given, True)
    assert {tuple(sorted(p)) for p in pts} == {("train.lr", "train.vbpr.reg")}  # other backbones' keys left out
    assert len(pts) == 7 * 2  # the reference's 7 values of vbpr.reg x the 2 given learning rates
    replaced = grid_points("bm3", {"train.bm3.layers": [3]}, True)  # a given key replaces the reference's values
    assert {p["train.bm3.layers"] for p in replaced} == {3} and len(replaced) == 2 * 2


def test_reference_grids_live_with_the_config_and_are_valid_settings():
    assert backbone_grid("mgcn") == {"train.mgcn.cl_weight": [1e-3, 1e-2, 1e-1]}
    assert backbone_grid("lattice") == {"train.lattice.reg_weight": [0.0, 1e-5, 1e-4, 1e-3],
                                        "train.lr": [1e-4, 5e-4, 1e-3, 5e-3]}
    assert backbone_grid("lgmrec") == {} and grid_points("lgmrec", None, True) == [{}]  # one-value lists only
    sizes = {b: len(grid_points(b, None, True)) for b in backbone_names()}
    assert sizes == {"lightgcn": 20, "vbpr": 7, "freedom": 8, "lattice": 16, "mgcn": 3, "smore": 32, "mmgcn": 30,
                     "bm3": 8, "lgmrec": 1, "pop": 1, "bpr": 7, "itemknncbf": 1}
    cfg = load_config(SAMPLE_DATA / "clearrec.toml")
    for b in backbone_names():
        for point in grid_points(b, None, True):
            train = cfg.with_overrides({"train.backbone": b, **point}).train  # every point is a valid config
            for key, value in point.items():
                node = train
                for part in key.split(".")[1:]:
                    node = getattr(node, part)
                assert node == value, (b, key)


def test_backbone_names_are_the_registry():
    from clearrec.models.registry import BACKBONES

    assert set(backbone_names()) == set(BACKBONES)
    assert {b for b in backbone_names() if featureless(b)} == {"lightgcn", "pop", "bpr"}


# ---- harness on the toy pipeline ---------------------------------------------------------
def test_compare_reuses_base_and_adopts_shared_stages(toy):
    res = toy.compare(["lightgcn", "vbpr"], seeds=[0, 1, 2], epochs=3)
    assert CALLS["ingest"] == CALLS["encode"] == 1  # encoded once
    assert CALLS["project"] == 2  # one CLEAR-off and one CLEAR-on fit, adopted by the other runs
    assert CALLS["train"] == 9  # lightgcn x 3 seeds (no CLEAR variant) + vbpr off/on x 3
    rows = {(r["backbone"], r["clear"]): r for r in res["rows"]}
    assert set(rows) == {("lightgcn", "n/a"), ("vbpr", "off"), ("vbpr", "on")}
    assert rows[("vbpr", "on")]["mean"]["recall@20"] == pytest.approx(0.10 + 0.02 + 0.004 + 0.001)
    assert rows[("vbpr", "off")]["std"]["recall@20"] == pytest.approx(0.001)
    (delta,) = res["deltas"]
    assert delta["backbone"] == "vbpr" and delta["recall@20"]["exceeds_noise"] is True
    (run,) = (toy.out.root / "runs").glob("vbpr-on-s1-*")
    assert os.path.samefile(run / "items.parquet", toy.base.root / "items.parquet")  # hard link, not a re-ingest
    assert json.loads((run / "model/metrics.json").read_text())["best_epoch"] == 3  # --epochs reached train
    saved = json.loads((toy.out.root / "compare.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["noise_rule"] == NOISE_RULE and saved["date"]
    md = (toy.out.root / "compare.md").read_text()
    assert "change on vs off" in md and "beyond noise" in md and "clearrec compare (test)" in md


def test_change_tables_give_verdict_and_p_value_their_own_columns(toy):
    toy.compare(["vbpr"], seeds=[0, 1, 2], epochs=3)
    md = (toy.out.root / "compare.md").read_text()
    assert md.count("Noise rule:") == 1 and NOISE_EXPLAINED in md  # stated once, with why they can disagree
    assert md.index("Noise rule:") < md.index("| backbone | metric | CLEAR off | CLEAR on |")  # above the table
    header = "| backbone | metric | CLEAR off | CLEAR on | change on vs off | verdict (2 SE rule) | paired t-test p |"
    assert header in md
    row = next(line for line in md.splitlines() if line.startswith("| vbpr | recall@20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4].endswith("%") and cells[5] == "beyond noise" and float(cells[6]) <= 1  # one fact per cell
    assert "(beyond noise" not in md and "p=" not in md
    html = write_report(toy.out.root, comparison=True)[0].read_text()
    section = html.split('<section id="comparison">')[1].split("</section>")[0]
    assert section.count("Noise rule:") == 1 and "<th>verdict (2 SE rule)</th><th>paired t-test p</th>" in section


def test_compare_rerun_resumes_without_training(toy):
    toy.compare(["vbpr"], seeds=[0], epochs=2)
    before = CALLS["train"]
    again = Harness(toy.config, toy.base.root, toy.out.root, stages=TOY)
    again.compare(["vbpr"], seeds=[0], epochs=2)
    assert CALLS["train"] == before


def test_experiments_share_equal_runs_and_separate_different_ones(toy):
    toy.compare(["vbpr"], seeds=[0], epochs=2)
    trained = CALLS["train"]
    toy.ablate("vbpr", seeds=[0], epochs=2)  # its "off" and "hard" runs equal compare's off / on
    table = ablations(declared_modalities(toy.config))
    assert CALLS["train"] == trained + len(table) - 2
    toy.compare(["vbpr"], seeds=[0], epochs=3)  # same names, other overrides: new run directories
    assert CALLS["train"] == trained + len(table)
    assert len(list((toy.out.root / "runs").glob("vbpr-off-s0-*"))) == 3  # compare x2 + the ablation's


def test_compare_grid_selected_on_valid_not_test(toy):
    res = toy.compare(["vbpr"], seeds=[0, 1], grid={"train.vbpr.reg": [1e-3, 1e-2]})
    for row in res["rows"]:
        assert row["grid"] == {"train.vbpr.reg": 1e-2}  # best on valid, although 1e-3 is best on test
        assert len(row["grid_valid"]) == 2


def test_compare_reference_grid_selected_on_valid(toy):
    res = toy.compare(["vbpr"], seeds=[0, 1], default_grid=True)
    assert CALLS["train"] == 7 * 2 * 2  # the 7 points of the reference grid x CLEAR off / on x 2 seeds
    for row in res["rows"]:
        assert row["grid"] == {"train.vbpr.reg": 1e-2}  # best on valid, although 1e-3 is best on test
        assert len(row["grid_valid"]) == 7
        clear = 0.02 + 0.004 if row["clear"] == "on" else 0.0
        assert row["mean"]["recall@20"] == pytest.approx(0.10 + clear + 0.0005)  # test at the chosen point
    assert "train.vbpr.reg=0.01" in (toy.out.root / "compare.md").read_text()


def test_compare_every_backbone(toy):
    res = toy.compare(list(backbone_names()), seeds=[0], epochs=2)
    rows = {(r["backbone"], r["clear"]) for r in res["rows"]}
    plain = {"lightgcn", "pop", "bpr"}
    assert rows == {(b, "n/a") for b in plain} | {(b, c) for b in set(backbone_names()) - plain for c in ("off", "on")}
    assert CALLS["train"] == len(rows) and all(r["n"] == 1 for r in res["rows"])
    with pytest.raises(ConfigError, match="unknown backbone.*'lightgnc'.*or all"):
        toy.compare(["lightgnc"], seeds=[0])


def test_failed_runs_are_reported_not_fatal(toy):
    res = toy.compare(["vbpr"], seeds=[0, 13], epochs=2)
    failed = [r for r in res["runs"] if r["labels"]["seed"] == 13]
    assert len(failed) == 2 and all(r["status"] == "failed" and "NaN" in r["error"] for r in failed)
    assert all(r["status"] == "ok" for r in res["runs"] if r["labels"]["seed"] == 0)
    assert all(row["n"] == 1 and len(row["failed"]) == 1 for row in res["rows"])
    md = (toy.out.root / "compare.md").read_text()
    assert "Failed runs" in md and "1 (1 failed)" in md


def test_ablations_cover_every_variant_and_the_random_control(toy):
    res = toy.ablate("vbpr", seeds=[0, 1], epochs=2)
    names = [r["ablation"] for r in res["rows"]]
    assert names == [a[0] for a in ablations(declared_modalities(toy.config))]
    assert "random" in names and {"image-only", "text-only"} <= set(names)
    has_directions = "directions" in ProjectConfig.model_fields
    rnd = next(r for r in res["rows"] if r["ablation"] == "random")
    assert rnd["status"] == ("ok" if has_directions else "unavailable")
    soft = next(r for r in res["rows"] if r["ablation"] == "soft")
    assert soft["mean"]["recall@20"] == pytest.approx(0.10 + 0.01 + 0.004 + 0.0005)
    assert {(d["ablation"], d["vs"]) for d in res["deltas"]} >= {("hard", "off"), ("soft", "off")}
    assert "random" in (toy.out.root / "ablations.md").read_text()


def test_sweep_chooses_on_valid_and_draws_heatmap(toy):
    res = toy.sweep("vbpr", ks=[2, 8], strengths=[0.5, 1.0], ratios=[0.9], seeds=[0], epochs=2)
    assert res["rows"] == ["k=2", "k=8", "ratio=0.9"]
    assert len(res["cells"]) == 6
    assert res["chosen"] == {"row": "k=8", "strength": 1.0}
    assert next(c for c in res["cells"] if c["row"] == "ratio=0.9")["k_used"] == [3]
    assert res["chosen_vs_off"]["recall@20"]["diff"] == pytest.approx(0.02 + 0.008)
    assert (toy.out.root / "sweep_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Chosen on valid: k=8, lambda=1.0" in (toy.out.root / "sweep.md").read_text()


def test_comparison_report_sections(toy):
    toy.compare(["vbpr"], seeds=[0], epochs=2)
    html_path, md_path = write_report(toy.out.root, comparison=True)
    html = html_path.read_text()
    for sid in ("comparison", "ablations", "sweep"):
        assert f'id="{sid}"' in html
    assert "not run: no sweep.json" in html and "not run: no ablations.json" in html
    assert "vbpr" in md_path.read_text()


# ---- the real stages on sample_data, tiny sizes ----------------------------------------------
TINY = {"train.epochs": 2, "train.patience": 2, "train.threads": 1}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The whole sample pipeline (ingest .. index) once, at 2 epochs: the base of every experiment below."""
    from clearrec.pipeline.registry import STAGES, stage_names
    from clearrec.pipeline.runner import Runner

    missing = {"ingest", "encode", "project", "train"} - set(stage_names())
    if missing:
        pytest.skip(f"stages {sorted(missing)} are not registered in pipeline/registry.py")
    cfg = load_config(SAMPLE_DATA / "clearrec.toml").with_overrides(TINY)
    root = tmp_path_factory.mktemp("sample")
    Runner(STAGES, cfg, root / "work").run()
    return cfg, root


def _cli(*args: str):
    from clearrec.pipeline.cli import app

    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def _sets() -> list[str]:
    return [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_sample_compare_and_ablations_cli(sample):
    cfg, root = sample
    base_manifest = (root / "work" / "manifest.json").read_text()
    res = _cli("compare", "--config", str(SAMPLE_DATA / "clearrec.toml"), "--workdir", str(root / "work"),
               "--out", str(root / "exp"), "--backbones", "lightgcn,vbpr", "--seeds", "0,1", "--epochs", "2",
               "--ablations", "--ablation-backbone", "vbpr", *_sets())
    assert "change on vs off" in res.output and "random orthonormal" in res.output
    out = json.loads((root / "exp" / "compare.json").read_text())
    rows = {(r["backbone"], r["clear"]): r for r in out["rows"]}
    assert set(rows) == {("lightgcn", "n/a"), ("vbpr", "off"), ("vbpr", "on")}
    for r in rows.values():
        assert r["n"] == 2 and not r["failed"]
        assert all(0 <= r["mean"][m] <= 1 and r["std"][m] >= 0 for m in TABLE_METRICS)
    assert set(out["deltas"][0]) >= {"backbone", *TABLE_METRICS}
    assert out["command"].startswith("clearrec compare") and "--epochs 2" in out["command"]
    assert (root / "work" / "manifest.json").read_text() == base_manifest  # nothing re-ingested or re-encoded
    for name in ("image.parquet", "text.parquet"):  # encoded once, linked into every run
        (run,) = (root / "exp" / "runs").glob("vbpr-on-s1-*")
        assert os.path.samefile(root / "work" / "features" / name, run / "features" / name)
    abl = json.loads((root / "exp" / "ablations.json").read_text())
    assert [r["status"] for r in abl["rows"]] == ["ok"] * len(ablations(declared_modalities(cfg)))
    (rnd_dir,) = (root / "exp" / "runs").glob("vbpr-random-s0-*")
    assert ArtifactStore(rnd_dir).read_json("clear/projector.json")["directions"] == "random"
    assert any(d["ablation"] == "hard" and d["vs"] == "random" for d in abl["deltas"])


@pytest.mark.slow
def test_sample_compare_every_backbone_and_a_reference_grid_cli(sample):
    cfg, root = sample
    common = ["--config", str(SAMPLE_DATA / "clearrec.toml"), "--workdir", str(root / "work"), "--seeds", "0",
              "--epochs", "1", *_sets()]
    _cli("compare", *common, "--out", str(root / "exp-all"), "--backbones", "all")
    out = json.loads((root / "exp-all" / "compare.json").read_text())
    assert out["backbones"] == list(backbone_names())
    assert {r["backbone"] for r in out["rows"]} == set(backbone_names())
    assert all(r["n"] == 1 and not r["failed"] for r in out["rows"]), [r["failed"] for r in out["rows"]]
    _cli("compare", *common, "--out", str(root / "exp-grid"), "--backbones", "mgcn", "--grid")
    out = json.loads((root / "exp-grid" / "compare.json").read_text())
    assert len(out["runs"]) == 3 * 2  # the reference's 3 values of cl_weight x CLEAR off / on
    for row in out["rows"]:
        valid = row["grid_valid"]
        assert len(valid) == 3 and row["grid"] == {"train.mgcn.cl_weight": [1e-3, 1e-2, 1e-1][valid.index(max(valid))]}
        assert row["valid_select"] == max(valid)


@pytest.mark.slow
def test_sample_sweep_and_reports(sample):
    cfg, root = sample
    _cli("sweep", "--config", str(SAMPLE_DATA / "clearrec.toml"), "--workdir", str(root / "work"),
         "--out", str(root / "exp"), "--backbone", "vbpr", "--k", "2,4", "--strength", "1.0", "--ratio", "0.5",
         "--seeds", "0", "--epochs", "2", *_sets())
    out = json.loads((root / "exp" / "sweep.json").read_text())
    assert out["rows"] == ["k=2", "k=4", "ratio=0.5"] and len(out["cells"]) == 3 and out["chosen"]
    assert (root / "exp" / "sweep_heatmap.png").is_file()
    _cli("report", "--comparison", str(root / "exp"))
    html = (root / "exp" / "report.html").read_text()
    for sid in ("comparison", "ablations", "sweep"):
        section = html.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "not run:" not in section, sid
    assert 'src="data:image/png;base64,' in html
    _cli("report", "--workdir", str(root / "work"))
    work_html = (root / "work" / "report.html").read_text()
    assert 'id="recommendations"' in work_html and "not run:" not in work_html
    assert raw_dumps(work_html) == {}  # the real artifacts, summarised in words
    if CHROMIUM:
        dom = _dump_dom(root / "exp" / "report.html")
        assert all(f'id="{sid}"' in dom for sid in ("comparison", "ablations", "sweep"))


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def _dump_dom(path: Path) -> str:
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout
