"""Last.fm-2K, real data with two real modalities (users' tags, the artists' audio), end to end:
``benchmarks/lastfm2k.toml`` (text encoded here, audio imported) and ``benchmarks/lastfm2k_mmrec.toml``
(the MMRec folder, both imported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import clearrec
from clearrec.pipeline.config import load_config
from clearrec.pipeline.experiments import Harness
from clearrec.pipeline.registry import STAGES
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "lastfm-2k"
QUIET = Console(stderr=True, quiet=True)
N_ITEMS = 1425

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "items.tsv").is_file(),
                       reason=f"Last.fm-2K is not at {DATA} (the shared datasets folder beside the repository)"),
]


def vectors(store: ArtifactStore, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(item ids as ints, (N, d) vectors) of a features file."""
    t = store.read_parquet(name)
    x, ok = arrow_to_vectors(t["vector"])
    assert ok.all()
    return np.array([int(i) for i in t["item_id"].to_pylist()]), x


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("lastfm") / "w"
    cfg = load_config(REPO / "benchmarks" / "lastfm2k.toml", ["train.epochs=3", "encode.threads=2"])
    Runner(STAGES, cfg, work, console=QUIET).run()
    return work


def test_encoded_text_matches_the_published_features_and_audio_is_imported(table_run):
    store = ArtifactStore(table_run)
    ids, text = vectors(store, "features/text.parquet")
    assert len(ids) == N_ITEMS and text.shape == (N_ITEMS, 384)
    published = np.load(DATA / "mmrec" / "all-MiniLM-L6-v2.npy", allow_pickle=False)[ids]
    cos = (text * published).sum(1) / np.linalg.norm(text, axis=1) / np.linalg.norm(published, axis=1)
    assert cos.mean() >= 0.999
    aids, audio = vectors(store, "features/audio.parquet")
    assert audio.shape == (N_ITEMS, 128)
    np.testing.assert_array_equal(audio, np.load(DATA / "mmrec" / "vggish.npy", allow_pickle=False)[aids]
                                  .astype(np.float32))


def test_pipeline_runs_to_a_projector_over_both_and_a_served_index(table_run):
    store = ArtifactStore(table_run)
    info = store.read_json("clear/projector.json")
    assert info["applied"] and info["modalities"] == ["text", "audio"] and info["k"] == 8
    diag = store.read_json("clear/diagnostics.json")
    assert diag["modalities"] == ["text", "audio"] and diag["spectrum_after"][0] < 0.2 * diag["spectrum_before"][0]
    assert set(store.read_json("model/model.json")["features"]) == {"text", "audio"}
    content = store.read_json("index/index_info.json")["content"]
    assert [(b["modality"], b["kind"]) for b in content["blocks"]] == [("text", "text"), ("audio", "imported")]
    rec = clearrec.open(table_run)
    assert len(rec.recommend("0", 10)) == 10
    assert len(rec.similar("0", 10)) == 10
    tags = dict(zip(store.read_parquet("items.parquet")["item_id"].to_pylist(),
                    store.read_parquet("items.parquet")["description"].to_pylist()))
    hits = rec.search_text("heavy metal, thrash metal", 10)
    assert sum("thrash metal" in tags[h.item_id] for h in hits) >= 8  # the artists listeners tagged so


def test_the_mmrec_folder_gives_the_same_features(table_run, tmp_path):
    cfg = load_config(REPO / "benchmarks" / "lastfm2k_mmrec.toml")
    Runner(STAGES[:2], cfg, tmp_path / "w", console=QUIET).run()
    mm, table = ArtifactStore(tmp_path / "w"), ArtifactStore(table_run)
    for name in ("text", "audio"):
        ids_m, x_m = vectors(mm, f"features/{name}.parquet")
        ids_t, x_t = vectors(table, f"features/{name}.parquet")
        x_m = x_m[np.argsort(ids_m)]
        x_t = x_t[np.argsort(ids_t)]
        cos = (x_m * x_t).sum(1) / np.linalg.norm(x_m, axis=1) / np.linalg.norm(x_t, axis=1)
        assert len(ids_m) == N_ITEMS and cos.min() >= 0.999, name
        if name == "audio":
            np.testing.assert_array_equal(x_m, x_t)
    assert mm.read_parquet("interactions.parquet").num_rows == table.read_parquet("interactions.parquet").num_rows


def test_shortened_study_clear_off_and_on_both_learn(table_run, tmp_path):
    """A lower-bound check of the study in RESULTS.md: FREEDOM with CLEAR off and on, one seed, 10 epochs,
    both well above the popularity ranking (test Recall@20 0.12, RESULTS.md)."""
    cfg = load_config(REPO / "benchmarks" / "lastfm2k.toml")
    res = Harness(cfg, table_run, tmp_path / "exp", console=QUIET).compare(["freedom"], seeds=[0], epochs=10)
    rows = {r["clear"]: r for r in res["rows"]}
    for clear in ("off", "on"):
        assert rows[clear]["n"] == 1 and rows[clear]["mean"]["recall@20"] > 0.2, clear
