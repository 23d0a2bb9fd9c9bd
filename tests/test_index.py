"""FAISS functions (models/ann.py) and the index stage on synthetic vectors."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pyarrow as pa
import pytest

from clearrec.models import ann
from clearrec.pipeline.config import Config
from clearrec.pipeline.errors import ConfigError, StageError
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore, vectors_to_arrow
from clearrec.stages import index as index_stage


def clustered(n: int, d: int = 16, clusters: int = 40, seed: int = 0, spread: float = 0.5) -> np.ndarray:
    """(n, d) float32 vectors around random cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    return (centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


def write_model(store: ArtifactStore, items: np.ndarray, users: np.ndarray, order: np.ndarray | None = None) -> None:
    """items.parquet + model/*_vectors.parquet (+ empty features) as the train stage leaves them."""
    n = len(items)
    ids = [f"it{i}" for i in range(n)]
    store.write_parquet("items.parquet", pa.table({
        "item_idx": pa.array(np.arange(n), pa.int64()), "item_id": ids, "title": [f"title {i}" for i in range(n)]}))
    order = np.arange(n) if order is None else order
    store.write_parquet("model/item_vectors.parquet", pa.table({
        "item_idx": pa.array(order, pa.int64()), "item_id": [ids[i] for i in order],
        "vector": vectors_to_arrow(items[order])}))
    store.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": pa.array(np.arange(len(users)), pa.int64()), "user_id": [f"u{u}" for u in range(len(users))],
        "vector": vectors_to_arrow(users)}))


def run_index(workdir, **overrides) -> Runner:
    runner = Runner([index_stage.SPEC], Config().with_overrides({f"index.{k}": v for k, v in overrides.items()}),
                    workdir)
    runner.run(force=True)
    return runner


# ---- models/ann.py -----------------------------------------------------------------------
def test_choose_factory_by_size_and_memory_budget():
    gib = 2**30
    assert ann.choose_factory(10_000, 64, 2 * gib) == "Flat"
    assert ann.choose_factory(10_000, 64, 2 * gib, exact_max_items=1_000) == "HNSW32"
    assert ann.choose_factory(1_000_000, 64, 2 * gib) == "HNSW32"
    big = ann.choose_factory(100_000_000, 64, 2 * gib)  # HNSW would need ~40 GB
    assert big.startswith("IVF") and ",PQ" in big
    assert ann.estimate_bytes(big, 100_000_000, 64) <= 2 * gib
    roomier = ann.choose_factory(100_000_000, 64, 8 * gib)
    assert int(roomier.split("PQ")[1]) > int(big.split("PQ")[1])  # more budget -> more code bytes
    with pytest.raises(ValueError, match="fits"):
        ann.choose_factory(100_000_000, 64, 2**20)


def test_estimate_bytes_is_close_to_the_built_index():
    x = clustered(4000, d=32)
    for factory in ("Flat", "HNSW16"):
        built = len(faiss.serialize_index(ann.build_index(x, factory)))
        assert 0.8 < ann.estimate_bytes(factory, len(x), 32) / built < 1.25, factory


@pytest.mark.parametrize("factory", ["HNSW16", "IVF64,Flat"])
def test_tune_reaches_the_recall_target_on_held_out_queries(factory):
    x = clustered(6000)
    queries = clustered(400, seed=1)
    tune_q, eval_q = queries[:200], queries[200:]
    index = ann.build_index(x, factory)
    tuning = ann.tune(index, [(tune_q, ann.exact_search(x, tune_q, 20)[1])], k=20, target=0.95)
    assert tuning.reached and tuning.recall >= 0.95
    assert [v for v, _ in tuning.curve] == sorted(v for v, _ in tuning.curve)
    assert all(r < 0.95 for _, r in tuning.curve[:-1])  # the smallest value that reaches the target
    ann.set_default(index, tuning.knob, tuning.value)
    held_out = ann.recall_at_k(ann.search(index, eval_q, 20)[1], ann.exact_search(x, eval_q, 20)[1], 20)
    assert held_out >= 0.9


def test_exact_index_equals_brute_force_inner_product():
    x, q = clustered(500), clustered(20, seed=3)
    scores, ids = ann.search(ann.build_index(x, "Flat"), q, 10)
    full = q @ x.T  # (20, 500)
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :10], rtol=1e-5)
    assert ann.recall_at_k(ids, ann.exact_search(x, q, 10)[1], 10) == 1.0


def test_per_call_parameters_never_change_the_shared_index():
    x, q = clustered(3000), clustered(64, seed=2)
    index = ann.build_index(x, "HNSW16")
    ann.set_default(index, "efSearch", 16)
    low = ann.search(index, q, 20, ann.search_parameters(index, ef_search=16))[1]
    high = ann.search(index, q, 20, ann.search_parameters(index, ef_search=512))[1]
    assert ann.default_knob(index) == ("efSearch", 16)
    exact = ann.exact_search(x, q, 20)[1]
    assert ann.recall_at_k(high, exact, 20) > ann.recall_at_k(low, exact, 20)

    results: dict[int, list[np.ndarray]] = {16: [], 512: []}
    errors = []

    def worker(ef: int) -> None:
        try:
            for _ in range(20):
                results[ef].append(ann.search(index, q, 20, ann.search_parameters(index, ef_search=ef))[1])
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ef,)) for ef in (16, 512, 16, 512)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(r, low) for r in results[16])
    assert all(np.array_equal(r, high) for r in results[512])
    assert ann.default_knob(index) == ("efSearch", 16)


def test_search_parameters_reach_through_wrappers_and_reject_the_wrong_knob():
    x, q = clustered(4000, d=16), clustered(8, seed=4)
    wrapped = ann.build_index(x, "PCA8,IVF32,Flat")
    assert ann.knob(wrapped) == "nprobe"
    one = ann.search(wrapped, q, 5, ann.search_parameters(wrapped, nprobe=1))[1]
    every = ann.search(wrapped, q, 5, ann.search_parameters(wrapped, nprobe=32))[1]
    assert not np.array_equal(one, every)
    assert ann.default_knob(wrapped) == ("nprobe", 1)
    with pytest.raises(ValueError, match="efSearch applies to HNSW"):
        ann.search_parameters(wrapped, ef_search=10)
    with pytest.raises(ValueError, match="nprobe applies to IVF"):
        ann.search_parameters(ann.build_index(x, "Flat"), nprobe=4)


# ---- the index stage ---------------------------------------------------------------------
def test_stage_writes_indexes_id_mappings_and_info(tmp_path):
    store = ArtifactStore(tmp_path)
    items, users = clustered(800), clustered(120, seed=5)
    write_model(store, items, users)
    runner = run_index(tmp_path)
    info = store.read_json("index/index_info.json")
    entry = info["items"]
    assert entry["factory"] == "Flat" and entry["auto"] and entry["metric"] == "inner_product"
    assert entry["ntotal"] == 800 and entry["dim"] == 16 and entry["recall"] == 1.0
    assert entry["sha256"] == store.checksum("index/items.faiss")
    assert entry["ids_sha256"] == store.checksum("index/items_ids.parquet")
    assert entry["held_out_queries"] == {"user": 60} and entry["build_seconds"] >= 0
    assert info["content"] is None and not store.exists("index/content.faiss")  # no features
    ids = store.read_parquet("index/items_ids.parquet")
    assert ids["row"].to_pylist() == list(range(800)) and ids["item_id"].to_pylist() == [f"it{i}" for i in range(800)]
    recorded = runner.manifest()["stages"]["index"]["outputs"]
    assert recorded["index/items.faiss"]["sha256"] == entry["sha256"]
    assert runner.status()["index"].state == "up-to-date"


def write_clear(store: ArtifactStore, modality: str, x: np.ndarray, valid: np.ndarray) -> None:
    """A features/<modality>_clear.parquet as the project stage writes it (policy "drop": nulls kept)."""
    n = len(x)
    store.write_parquet(f"features/{modality}_clear.parquet", pa.table({
        "item_idx": pa.array(np.arange(n), pa.int64()), "item_id": [f"it{i}" for i in range(n)],
        "vector": vectors_to_arrow(x, valid), "status": ["ok" if v else "missing" for v in valid],
        "error": pa.array([None] * n, pa.string()), "filled": pa.array(np.zeros(n, dtype=bool))}),
        metadata={"modality": modality, "encoder": f"enc-{modality}", "dim": x.shape[1], "normalized": False,
                  "projector": "ab" * 32, "clear_enabled": True, "missing": "drop"})


def test_stage_builds_the_content_index_from_normalised_blocks(tmp_path):
    store = ArtifactStore(tmp_path)
    n = 300
    write_model(store, clustered(n), clustered(40, seed=9))
    image, text = clustered(n, d=12, seed=10), clustered(n, d=20, seed=11)
    img_ok, txt_ok = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    img_ok[[3, 4]] = False  # no image: a zero image block
    img_ok[7] = txt_ok[7] = False  # no content at all: not in the content index
    write_clear(store, "image", image, img_ok)
    write_clear(store, "text", text, txt_ok)
    run_index(tmp_path, content_features="projected")
    info = store.read_json("index/index_info.json")["content"]
    assert [(b["modality"], b["start"], b["dim"], b["encoder"]) for b in info["blocks"]] == [
        ("image", 0, 12, "enc-image"), ("text", 12, 20, "enc-text")]
    assert [b["projected"] for b in info["blocks"]] == [True, True] and info["features"] == "projected"
    assert set(info["recall_by_query"]) == {"all", "image", "text"} and info["recall"] == 1.0
    ids = store.read_parquet("index/content_ids.parquet")["item_id"].to_pylist()
    assert ids == [f"it{i}" for i in range(n) if i != 7] and info["ntotal"] == n - 1
    rows = faiss.read_index(str(store.path("index/content.faiss"))).reconstruct_n(0, n - 1)  # (n - 1, 32)
    keep = np.array([i for i in range(n) if i != 7])
    np.testing.assert_allclose(rows[:, 12:], text[keep] / np.linalg.norm(text[keep], axis=1, keepdims=True),
                               rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rows[:, :12], axis=1), np.where(img_ok[keep], 1.0, 0.0), atol=1e-5)

    run_index(tmp_path, content=False, content_features="projected")  # switching the content index off removes its files
    assert store.read_json("index/index_info.json")["content"] is None
    assert not store.exists("index/content.faiss") and not store.exists("index/content_ids.parquet")


def test_content_index_holds_the_raw_features_by_default_and_fills_as_project_did(tmp_path):
    store = ArtifactStore(tmp_path)
    n = 120
    write_model(store, clustered(n), clustered(40, seed=9))
    raw = {"image": clustered(n, d=12, seed=10), "text": clustered(n, d=20, seed=11)}
    ok = np.ones(n, dtype=bool)
    ok[[3, 4]] = False  # no image vector: project filled it with the mean (encode.missing = "mean")
    fill = raw["image"][ok].mean(0)
    for m, x in raw.items():
        valid = ok if m == "image" else np.ones(n, dtype=bool)
        store.write_parquet(f"features/{m}.parquet", pa.table({
            "item_idx": pa.array(np.arange(n), pa.int64()), "item_id": [f"it{i}" for i in range(n)],
            "vector": vectors_to_arrow(x, valid)}),
            metadata={"modality": m, "kind": m, "encoder": f"enc-{m}", "dim": x.shape[1], "normalized": False})
        projected = x - x.mean(0)  # stands in for the CLEAR projection: anything but the raw features
        write_clear(store, m, projected, np.ones(n, dtype=bool))
    store.write_json("clear/projector.json", {"modalities": ["text", "image"], "inputs": {"image": {}, "text": {}}})
    store.write_tensors("clear/fill.safetensors", {"image": np.zeros(12, np.float32), "image.raw": fill.astype(np.float32),
                                                   "text": np.zeros(20, np.float32),
                                                   "text.raw": raw["text"].mean(0).astype(np.float32)})
    s = ArtifactStore(tmp_path)
    meta = s.parquet_metadata("features/image_clear.parquet")
    s.write_parquet("features/image_clear.parquet", s.read_parquet("features/image_clear.parquet"),
                    metadata={**meta, "missing": "mean"})
    run_index(tmp_path)
    info = store.read_json("index/index_info.json")["content"]
    assert info["features"] == "raw" and [b["modality"] for b in info["blocks"]] == ["text", "image"]  # project's order
    assert [b["projected"] for b in info["blocks"]] == [False, False] and [b["kind"] for b in info["blocks"]] == [
        "text", "image"]
    rows = faiss.read_index(str(store.path("index/content.faiss"))).reconstruct_n(0, n)  # (n, 32)
    image = np.where(ok[:, None], raw["image"], fill)
    np.testing.assert_allclose(rows[:, 20:], image / np.linalg.norm(image, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows[:, :20], raw["text"] / np.linalg.norm(raw["text"], axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)


def test_stage_auto_hnsw_meets_the_recall_target(tmp_path):
    store = ArtifactStore(tmp_path)
    write_model(store, clustered(5000), clustered(400, seed=6))
    run_index(tmp_path, exact_max_items=1000, hnsw_m=16, tune_queries=400)
    entry = store.read_json("index/index_info.json")["items"]
    assert entry["factory"] == "HNSW16" and entry["knob"] == "efSearch" and entry["tuning"]["reached"]
    assert entry["recall"] >= 0.9 and entry["tuning"]["recall"] >= 0.95
    index = faiss.read_index(str(store.path("index/items.faiss")))
    assert ann.default_knob(index) == ("efSearch", entry["knob_value"])  # the tuned value is saved


def test_id_mapping_survives_a_rebuild_from_reordered_vectors(tmp_path):
    store = ArtifactStore(tmp_path)
    items, users = clustered(600), clustered(50, seed=7)
    write_model(store, items, users)
    run_index(tmp_path)
    before = store.read_parquet("index/items_ids.parquet").to_pylist()
    index = faiss.read_index(str(store.path("index/items.faiss")))
    before_hits = ann.search(index, users, 10)[1]
    write_model(store, items, users, order=np.random.default_rng(0).permutation(600))  # rows shuffled
    run_index(tmp_path, factory="HNSW32")
    assert store.read_parquet("index/items_ids.parquet").to_pylist() == before
    index = faiss.read_index(str(store.path("index/items.faiss")))
    ids_file = store.read_parquet("index/items_ids.parquet")
    np.testing.assert_array_equal(index.reconstruct_n(0, 600), items[ids_file["item_idx"].to_numpy()])
    after_hits = ann.search(index, users, 10, ann.search_parameters(index, ef_search=600))[1]
    assert np.mean(before_hits == after_hits) > 0.95


def test_stage_records_and_warns_when_the_recall_target_is_out_of_reach(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    write_model(store, clustered(2000, d=8), clustered(100, d=8, seed=8))
    run_index(tmp_path, factory="IVF16,PQ2x4")  # 2 x 4-bit codes: far too coarse for recall 0.95
    entry = store.read_json("index/index_info.json")["items"]
    assert entry["knob"] == "nprobe" and not entry["tuning"]["reached"] and entry["recall"] < 0.95
    assert [v for v, _ in entry["tuning"]["curve"]] == [1, 2, 4, 8, 16]  # every nprobe up to nlist was tried
    assert "below index.recall_target" in " ".join(capsys.readouterr().err.split())  # rich wraps lines


def test_stage_rejects_vectors_that_do_not_match_items(tmp_path):
    store = ArtifactStore(tmp_path)
    write_model(store, clustered(50), clustered(10))
    table = store.read_parquet("model/item_vectors.parquet")
    store.write_parquet("model/item_vectors.parquet",
                        table.set_column(1, "item_id", pa.array([f"x{i}" for i in range(50)])))
    with pytest.raises(StageError, match="does not match items.parquet"):
        run_index(tmp_path)


def test_stage_reports_a_bad_factory_string(tmp_path):
    write_model(ArtifactStore(tmp_path), clustered(300), clustered(20))
    with pytest.raises(ConfigError, match="index.factory"):
        run_index(tmp_path, factory="NotAnIndex12")
    with pytest.raises(StageError, match="index.factory"):  # valid string, too few vectors to train
        run_index(tmp_path, factory="IVF4096,Flat")


def test_stage_reports_a_memory_budget_nothing_fits(tmp_path):
    write_model(ArtifactStore(tmp_path), clustered(120_000, clusters=10), clustered(20))  # IVF-PQ needs > 1 MiB
    with pytest.raises(StageError, match="memory_budget_mb"):
        run_index(tmp_path, exact_max_items=0, memory_budget_mb=1)


def test_config_rejects_unknown_index_keys():
    with pytest.raises(ConfigError, match="did you mean"):
        Config().with_overrides({"index.recal_target": 0.9})
    assert "index.serve" not in index_stage.SPEC.config_keys  # serving knobs never trigger a rebuild
