"""The project stage on synthetic features with planted shared directions (written per the contract)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from clearrec.models.clear import ClearOptions, ClearProjector
from clearrec.models.clear_multi import MultiClearProjector
from clearrec.pipeline.config import Config
from clearrec.pipeline.errors import ArtifactError, InputDataError
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.stage import StageContext
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors, vectors_to_arrow
from clearrec.stages import _project_io, project
from clearrec.stages.project import diagnose

N, DV, DT, R = 600, 24, 16, 3  # items, image dim, text dim, planted shared rank


def planted(n: int = N, seed: int = 0, shared: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Image/text features that share an R-dim latent (strong) plus independent per-modality noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, R)) * shared  # (n, R) shared latent
    xv = z @ rng.standard_normal((R, DV)) + rng.standard_normal((n, DV)) + 0.5  # (n, DV), non-zero mean
    xt = z @ rng.standard_normal((R, DT)) + rng.standard_normal((n, DT)) - 0.3
    return xv.astype(np.float32), xt.astype(np.float32)


def write_features(store: ArtifactStore, modality: str, x: np.ndarray, valid: np.ndarray | None = None,
                   row_group_size: int | None = None, name: str | None = None) -> None:
    n = len(x)
    valid = np.ones(n, dtype=bool) if valid is None else valid
    table = pa.table({
        "item_idx": pa.array(np.arange(n), pa.int64()),
        "item_id": pa.array([f"i{i}" for i in range(n)]),
        "vector": vectors_to_arrow(x, valid),
        "status": pa.array(["ok" if v else "decode_error" for v in valid]),
        "error": pa.array([None if v else "bad file" for v in valid], pa.string()),
        "content_sha256": pa.array([f"{i:064x}" for i in range(n)]),
    })
    meta = {"modality": modality, "encoder": f"test-{modality}", "dim": x.shape[1], "normalized": False,
            "preprocess": "none", "untrained": True}
    store.write_parquet(name or f"features/{modality}.parquet", table, metadata=meta, row_group_size=row_group_size)


def write_interactions(store: ArtifactStore, train_items: np.ndarray, other_items: np.ndarray) -> None:
    items = np.concatenate([train_items, other_items])
    split = ["train"] * len(train_items) + ["test"] * len(other_items)
    store.write_parquet("interactions.parquet", pa.table({
        "user_idx": pa.array(np.arange(len(items)) % 7, pa.int64()),
        "item_idx": pa.array(items, pa.int64()),
        "timestamp": pa.array([None] * len(items), pa.int64()),
        "rating": pa.array([None] * len(items), pa.float64()),
        "split": pa.array(split),
    }))


def run_stage(tmp_path, overrides: dict | None = None, sub: str = "w"):
    store = ArtifactStore(tmp_path / sub)
    cfg = Config().with_overrides({"project.k": R, "project.overlap_k": 10, **(overrides or {})})
    return store, cfg


def go(store: ArtifactStore, cfg: Config):
    return project.run(StageContext(store=store, config=cfg))


def read_clear(store: ArtifactStore, modality: str):
    t = store.read_parquet(f"features/{modality}_clear.parquet")
    x, ok = arrow_to_vectors(t.column("vector"))
    return t, x, ok


@pytest.fixture
def planted_store(tmp_path):
    store, cfg = run_stage(tmp_path)
    xv, xt = planted()
    write_features(store, "image", xv, row_group_size=100)
    write_features(store, "text", xt, row_group_size=64)
    return store, cfg, xv, xt


def test_planted_overlap_and_spectrum_drop_and_are_reported(planted_store):
    store, cfg, xv, xt = planted_store
    result = go(store, cfg)
    diag = store.read_json("clear/diagnostics.json")
    o = diag["overlap@10"]
    assert o["before"] > 0.3 and o["after"] < o["before"] / 3  # planted structure makes image/text agree
    assert diag["spectrum_after"][0] < 0.2 * diag["spectrum_before"][0]
    assert diag["top_singular_values"]["after"][0] == pytest.approx(diag["spectrum_after"][0])
    assert "overlap@10" in result.summary and "sigma_1" in result.summary and "%" in result.summary
    assert result.counts["overlap_after"] < result.counts["overlap_before"]
    assert 0 < diag["variance_kept"]["image"] < 1 and 0 < diag["variance_kept"]["text"] < 1
    for name in ("spectrum", "overlap", "similarity", "variance"):
        assert store.path(f"clear/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result.outputs) >= {"clear/projector.safetensors", "clear/projector.json",
                                   "features/image_clear.parquet", "features/text_clear.parquet"}


def test_projected_files_match_projector_and_contract(planted_store):
    store, cfg, xv, xt = planted_store
    result = go(store, cfg)
    tensors, _ = store.read_tensors("clear/projector.safetensors")
    info = store.read_json("clear/projector.json")
    assert info["k"] == R and info["strength"] == 1.0 and info["dims"] == {"image": DV, "text": DT}
    assert info["applied"] and "fit_seconds" not in info and 0 < info["energy_removed"]["image|text"] <= 1
    assert info["mode"] == "static" and info["k_requested"] == R and "seed" not in info  # seed: no effect here
    assert result.counts["fit_seconds"] >= 0  # timings go to the manifest, so the file is deterministic
    proj = MultiClearProjector.from_state(tensors, info)
    t, yv, ok = read_clear(store, "image")
    assert t.column_names == ["item_idx", "item_id", "vector", "status", "error", "content_sha256", "filled"]
    np.testing.assert_allclose(yv, proj.transform("image", xv), atol=1e-5)
    meta = store.parquet_metadata("features/image_clear.parquet")
    assert meta["projector"] == store.checksum("clear/projector.safetensors") and meta["clear_enabled"] is True
    assert meta["encoder"] == "test-image" and meta["dim"] == DV
    _, yt, _ = read_clear(store, "text")
    np.testing.assert_allclose(yt, proj.transform("text", xt), atol=1e-5)
    # the stage's analytic "after" spectrum is the measured cross-covariance spectrum of the written files
    yv64, yt64 = yv.astype(np.float64), yt.astype(np.float64)
    C = (yv64 - yv64.mean(0)).T @ (yt64 - yt64.mean(0)) / N
    measured = np.linalg.svd(C, compute_uv=False)
    diag = store.read_json("clear/diagnostics.json")
    np.testing.assert_allclose(measured, diag["spectrum_after"], atol=1e-4 * diag["spectrum_before"][0])
    assert diag["energy_curve_after"][-1] == pytest.approx(1 - info["energy_removed"]["image|text"], abs=1e-9)
    assert diag["energy_curve_before"][-1] == pytest.approx(1.0)


@pytest.mark.slow
def test_disabled_passes_vectors_through_byte_identical(planted_store):
    store, cfg, xv, xt = planted_store
    go(store, cfg)  # an enabled run first: its projector must not survive the disabled run
    result = go(store, cfg.with_overrides({"project.enabled": False}))
    for modality, x in (("image", xv), ("text", xt)):
        src = store.read_parquet(f"features/{modality}.parquet").column("vector").combine_chunks()
        t = store.read_parquet(f"features/{modality}_clear.parquet")
        out = t.column("vector").combine_chunks()
        assert out.values.to_numpy().tobytes() == src.values.to_numpy().tobytes()
        meta = store.parquet_metadata(f"features/{modality}_clear.parquet")
        assert meta["projector"] is None and meta["clear_enabled"] is False
    info = store.read_json("clear/projector.json")
    assert info["applied"] is False and info["reason"] == "project.enabled = false" and info["k"] == 0
    assert not store.exists("clear/projector.safetensors") and not store.exists("clear/diagnostics.json")
    assert "clear/projector.safetensors" not in result.outputs


def test_missing_policy_mean_fills_and_flags(tmp_path):
    store, cfg = run_stage(tmp_path, {"encode.missing": "mean"})
    xv, xt = planted()
    okv = np.ones(N, bool)
    okv[[3, 50, 51]] = False
    okt = np.ones(N, bool)
    okt[[7, 51]] = False
    write_features(store, "image", xv, okv)
    write_features(store, "text", xt, okt)
    result = go(store, cfg)
    assert result.counts["fit_items"] == N - 4  # items with both vectors
    tensors, _ = store.read_tensors("clear/projector.safetensors")
    proj = MultiClearProjector.from_state(tensors, store.read_json("clear/projector.json"))
    t, yv, ok = read_clear(store, "image")
    assert ok.all() and t.column("filled").to_numpy().tolist() == (~okv).tolist()
    assert t.column("status").to_pylist()[3] == "decode_error"  # status kept
    fill = xv[okv].astype(np.float64).mean(0)
    np.testing.assert_allclose(yv[3], proj.transform("image", fill), atol=1e-4)
    np.testing.assert_allclose(yv[okv], proj.transform("image", xv[okv]), atol=1e-5)
    assert store.parquet_metadata("features/image_clear.parquet")["filled"] == 3
    # the projector is the one fit on the items with both vectors
    both = okv & okt
    ref = ClearProjector(ClearOptions(k=R)).fit(xv[both], xt[both])
    np.testing.assert_allclose(proj.spectrum("image") / proj.weights_["text"], ref.spectrum(), rtol=1e-5)


def test_missing_policy_drop_keeps_nulls(tmp_path):
    store, cfg = run_stage(tmp_path, {"encode.missing": "drop"})
    xv, xt = planted()
    okt = np.ones(N, bool)
    okt[[0, 9]] = False
    write_features(store, "image", xv)
    write_features(store, "text", xt, okt)
    result = go(store, cfg)
    assert result.counts["fit_items"] == N - 2 and result.counts["missing_text"] == 2
    t, yt, ok = read_clear(store, "text")
    assert ok.tolist() == okt.tolist() and not any(t.column("filled").to_pylist())
    _, _, okv_out = read_clear(store, "image")
    assert okv_out.all()


def test_fit_on_train_uses_train_items_only(tmp_path):
    store, cfg = run_stage(tmp_path, {"project.fit_on": "train"})
    xv, xt = planted()
    write_features(store, "image", xv)
    write_features(store, "text", xt)
    train = np.arange(0, N, 2)
    write_interactions(store, train, np.arange(1, N, 4))  # odd items only in test
    result = go(store, cfg)
    assert result.counts["fit_items"] == len(train)
    tensors, _ = store.read_tensors("clear/projector.safetensors")
    got = MultiClearProjector.from_state(tensors, store.read_json("clear/projector.json"))
    ref = ClearProjector(ClearOptions(k=R)).fit(xv[train], xt[train])
    np.testing.assert_allclose(got.spectrum("image") / got.weights_["text"], ref.spectrum(), rtol=1e-5)
    np.testing.assert_allclose(got.directions_["image"], ref.directions_visual_, atol=1e-5)
    # every item is still projected
    _, yv, _ = read_clear(store, "image")
    np.testing.assert_allclose(yv, ref.transform_visual(xv), atol=1e-4)


@pytest.mark.slow
def test_small_chunks_equal_big_chunks(tmp_path):
    outs = []
    for sub, rows in (("small", 37), ("big", 100000)):
        store, cfg = run_stage(tmp_path, {"project.chunk_rows": rows, "project.diagnostics_items": 200}, sub)
        xv, xt = planted()
        write_features(store, "image", xv, row_group_size=50)
        write_features(store, "text", xt, row_group_size=128)
        go(store, cfg)
        outs.append((read_clear(store, "image")[1], read_clear(store, "text")[1],
                     store.read_json("clear/diagnostics.json"), store.read_tensors("clear/projector.safetensors")[0]))
    (av, at, ad, ap), (bv, bt, bd, bp) = outs
    np.testing.assert_allclose(av, bv, atol=1e-5)
    np.testing.assert_allclose(at, bt, atol=1e-5)
    # float32 chunk products: equal to float32 precision relative to the largest singular value
    np.testing.assert_allclose(ad["spectrum_before"], bd["spectrum_before"], atol=1e-6 * bd["spectrum_before"][0])
    assert ad["overlap@10"] == pytest.approx(bd["overlap@10"], abs=1e-6)  # same seeded sample
    np.testing.assert_allclose(ap["directions.image"], bp["directions.image"], atol=1e-5)


def test_one_modality_passes_through_and_says_why(tmp_path):
    store, cfg = run_stage(tmp_path)
    xv, xt = planted()
    write_features(store, "text", xt)
    result = go(store, cfg)
    info = store.read_json("clear/projector.json")
    assert info["applied"] is False and "only text features exist" in info["reason"]
    assert result.outputs == ["features/text_clear.parquet", "clear/fill.safetensors", "clear/projector.json"]
    np.testing.assert_array_equal(read_clear(store, "text")[1], xt)
    assert "only text" in result.summary


def test_no_features_at_all_is_an_id_only_pass_through(tmp_path):
    store, cfg = run_stage(tmp_path)
    store.write_json("clear/diagnostics.json", {"stale": True})
    result = go(store, cfg)
    info = store.read_json("clear/projector.json")
    assert info["applied"] is False and "no feature files" in info["reason"]
    assert result.outputs == ["clear/projector.json"]
    assert not store.exists("clear/diagnostics.json")


def test_dynamic_mode_passes_through(planted_store):
    store, cfg, xv, xt = planted_store
    go(store, cfg.with_overrides({"project.mode": "dynamic"}))
    assert "dynamic" in store.read_json("clear/projector.json")["reason"]
    np.testing.assert_array_equal(read_clear(store, "image")[1], xv)


def test_ratio_random_directions_and_modality_switch(planted_store):
    store, cfg, xv, xt = planted_store
    go(store, cfg.with_overrides({"project.ratio": 0.9, "project.directions": "random",
                                  "project.modalities": {"text": False}}))
    info = store.read_json("clear/projector.json")
    shared = ClearProjector(ClearOptions(ratio=0.9)).fit(xv, xt)
    assert info["k"] == shared.k_ and info["directions"] == "random" and info["ratio"] == 0.9
    assert info["k_requested"] is None and info["seed"] == 0
    np.testing.assert_array_equal(read_clear(store, "text")[1], xt)  # text switched off
    assert store.parquet_metadata("features/text_clear.parquet")["clear_enabled"] is False
    diag = store.read_json("clear/diagnostics.json")
    # random directions barely touch the shared subspace: the top singular value stays
    assert diag["spectrum_after"][0] > 0.5 * diag["spectrum_before"][0]


def test_misaligned_feature_files_are_refused(tmp_path):
    store, cfg = run_stage(tmp_path)
    xv, xt = planted()
    write_features(store, "image", xv)
    write_features(store, "text", xt[:-1])
    with pytest.raises(ArtifactError, match="different row counts"):
        go(store, cfg)


def test_feature_files_listing_items_in_different_order_are_refused(tmp_path):
    store, cfg = run_stage(tmp_path)
    xv, xt = planted()
    write_features(store, "image", xv)
    write_features(store, "text", xt)
    table = store.read_parquet("features/text.parquet")
    order = np.r_[1, 0, 2 : len(xt)]
    store.write_parquet("features/text.parquet", table.take(order), metadata=store.parquet_metadata("features/text.parquet"))
    with pytest.raises(ArtifactError, match="list different items in rows 0"):
        go(store, cfg)


def test_too_few_fit_items_is_an_input_error(tmp_path):
    store, cfg = run_stage(tmp_path, {"project.fit_on": "train"})
    xv, xt = planted(n=20)
    write_features(store, "image", xv)
    write_features(store, "text", xt)
    write_interactions(store, np.array([4]), np.arange(5, 10))
    with pytest.raises(InputDataError, match="at least 2 items"):
        go(store, cfg)


def test_runner_fingerprint_covers_project_and_missing_policy(planted_store):
    store, cfg, _, _ = planted_store
    runner = Runner([project.SPEC], cfg, store.root)
    assert runner.run() == ["project"]
    assert runner.run() == []  # up to date
    runner = Runner([project.SPEC], cfg.with_overrides({"encode.missing": "drop"}), store.root)
    assert runner.status()["project"].reason == "config changed: encode.missing"
    runner = Runner([project.SPEC], cfg.with_overrides({"project.strength": 0.5}), store.root)
    assert runner.status()["project"].reason == "config changed: project.strength"


@pytest.mark.slow
def test_diagnose_measures_from_files(planted_store):
    store, cfg, _, _ = planted_store
    go(store, cfg)
    stage_diag = store.read_json("clear/diagnostics.json")
    measured, _ = diagnose(store, cfg, ArtifactStore(store.root / "diagnose"))
    np.testing.assert_allclose(measured["spectrum_before"], stage_diag["spectrum_before"], rtol=1e-4)
    np.testing.assert_allclose(measured["spectrum_after"], stage_diag["spectrum_after"],
                               atol=1e-4 * stage_diag["spectrum_before"][0])
    assert measured["overlap@10"] == pytest.approx(stage_diag["overlap@10"], abs=1e-6)
    assert measured["variance_kept"]["image"] == pytest.approx(stage_diag["variance_kept"]["image"], rel=1e-4)


@pytest.mark.slow
def test_diagnose_cli_writes_json_and_plots(planted_store, tmp_path):
    from typer.testing import CliRunner

    from clearrec.pipeline.cli import app

    store, cfg, _, _ = planted_store
    go(store, cfg)
    stage_sha = store.checksum("clear/diagnostics.json")
    conf = tmp_path / "clearrec.toml"
    conf.write_text(f'workdir = "{store.root}"\n[project]\nk = {R}\n')
    out = tmp_path / "diag_out"
    res = CliRunner().invoke(app, ["diagnose", "--config", str(conf), "--out", str(out), "--overlap-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert "overlap@5" in printed and printed["overlap@5"]["after"] < printed["overlap@5"]["before"]
    assert json.loads((out / "diagnostics.json").read_text())["k"] == R
    assert (out / "spectrum.png").is_file() and (out / "overlap.png").is_file()
    assert store.checksum("clear/diagnostics.json") == stage_sha  # the stage's outputs are untouched


def test_rechunk_cuts_exact_chunks_across_batches(tmp_path):
    store = ArtifactStore(tmp_path)
    x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
    write_features(store, "image", x, row_group_size=9)
    table = store.read_parquet("features/image.parquet")
    uneven = [table.slice(lo, n).combine_chunks().to_batches()[0] for lo, n in ((0, 5), (5, 30), (35, 1), (36, 34))]
    got = list(_project_io._rechunk(iter(uneven), 16))
    assert [b.num_rows for b in got] == [16, 16, 16, 16, 6]
    np.testing.assert_array_equal(np.concatenate([arrow_to_vectors(b.column("vector"))[0] for b in got]), x)
    src = _project_io.open_features(store, "features/image.parquet", "image")
    assert [b.num_rows for (b,) in _project_io.iter_aligned([src], 16)] == [16, 16, 16, 16, 6]
