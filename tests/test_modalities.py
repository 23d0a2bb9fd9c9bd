"""Modalities as data: ``[encode.modalities.<name>]`` tables, imported vector files, and every stage
over any number of named modalities (three here), CLEAR included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from rich.console import Console

import clearrec
from clearrec.models.clear import ClearOptions, ClearProjector
from clearrec.models.clear_multi import MultiClearProjector
from clearrec.pipeline.config import load_config
from clearrec.pipeline.errors import ArtifactError, ConfigError, StageError
from clearrec.pipeline.registry import STAGES
from clearrec.pipeline.report import write_report
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors
from clearrec.pipeline.workdir import declared_modalities

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(stderr=True, quiet=True)
N_ITEMS, N_USERS = 60, 40


def catalog(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Items 0..59 in 3 clusters, users who each like one cluster, and three modalities of vectors that
    share the cluster signal: ``audio`` (.npy, float64, large norms), ``video`` (Parquet, ids shuffled),
    ``lyrics`` (.npy, float16)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cluster = np.arange(N_ITEMS) % 3
    with open(folder / "items.csv", "w") as f:
        f.write("item_id,title\n" + "".join(f"{i},item {i}\n" for i in range(N_ITEMS)))
    rows = ["user_id,item_id"]
    for u in range(N_USERS):
        liked = rng.choice(np.flatnonzero(cluster == u % 3), 8, replace=False)
        rows += [f"u{u},{i}" for i in liked]
    (folder / "interactions.csv").write_text("\n".join(rows) + "\n")
    shared = rng.normal(size=(3, 6))[cluster]  # (N, 6): what the modalities share
    vectors = {
        "audio": np.hstack([shared, rng.normal(size=(N_ITEMS, 10))]) @ rng.normal(size=(16, 12)) * 1000.0,
        "video": np.hstack([shared, rng.normal(size=(N_ITEMS, 4))]) @ rng.normal(size=(10, 8)),
        "lyrics": np.hstack([shared, rng.normal(size=(N_ITEMS, 6))]) @ rng.normal(size=(12, 10)),
    }
    np.save(folder / "audio.npy", vectors["audio"].astype(np.float64))
    order = rng.permutation(N_ITEMS)
    pq.write_table(pa.table({"item_id": pa.array(order.astype(str)),
                             "vector": pa.array(vectors["video"][order].astype(np.float32).tolist())}),
                   folder / "video.parquet")
    np.save(folder / "lyrics.npy", vectors["lyrics"].astype(np.float16))
    return vectors


def write_config(folder: Path, modalities: dict[str, dict], **sections) -> Path:
    data = {"ingest": {"items": "items.csv", "interactions": "interactions.csv", "seed": 0},
            "encode": {"modalities": modalities}, "project": {"k": 3},
            "train": {"backbone": "freedom", "epochs": 3, "threads": 1, "embedding_size": 16, "lr": 0.01}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = folder / "clearrec.toml"
    path.write_text(tomli_w.dumps(data))
    return path


THREE = {"audio": {"encoder": "imported", "file": "audio.npy"},
         "video": {"encoder": "imported", "file": "video.parquet"},
         "lyrics": {"encoder": "imported", "file": "lyrics.npy"}}


# ---- config ------------------------------------------------------------------------------
def test_old_encoder_keys_are_refused_with_the_equivalent_tables(tmp_path):
    path = tmp_path / "clearrec.toml"
    path.write_text('[encode]\nimage_encoder = "none"\ntext_encoder = "all-MiniLM-L6-v2"\ntext_template = "{title}"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "no longer read" in msg and str(path) in msg
    assert '[encode.modalities.text]\nencoder = "all-MiniLM-L6-v2"\ntemplate = "{title}"' in msg
    assert "[encode.modalities.image]" not in msg  # "none": that modality is left out
    path.write_text("[project]\nvisual = false\n")
    with pytest.raises(ConfigError, match=r"project.modalities.*image = false"):
        load_config(path)


@pytest.mark.parametrize("table, match", [
    ({"Audio": {"encoder": "imported"}}, "lowercase identifiers"),
    ({"text_clear": {"encoder": "imported"}}, "_clear"),
    ({"audio": {"encoder": "imported", "template": "{title}"}}, "template does not apply"),
    ({"text": {"encoder": "all-MiniLM-L6-v2", "file": "x.npy"}}, "file does not apply"),
    ({"text": {"encoder": "all-MiniLM-L6-v2", "colum": "x"}}, "unknown config key 'encode.modalities.text.colum'"),
])
def test_bad_modality_tables_are_config_errors(tmp_path, table, match):
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"encode": {"modalities": table}}))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_declared_order_and_none(tmp_path):
    path = write_config(tmp_path, {"video": {"encoder": "imported"}, "audio": {"encoder": "imported"}})
    cfg = load_config(path, ["encode.modalities.video.encoder=none"])
    assert list(cfg.encode.modalities) == ["video", "audio"] and declared_modalities(cfg) == ["audio"]


# ---- imported files ------------------------------------------------------------------------
def run_to(folder: Path, config: Path, to: str = "encode", overrides: tuple[str, ...] = ()) -> ArtifactStore:
    cfg = load_config(config, overrides)
    names = [s.name for s in STAGES]
    Runner(STAGES[: names.index(to) + 1], cfg, folder / "w", console=QUIET).run()
    return ArtifactStore(folder / "w")


def test_imported_npy_and_parquet_rows_follow_the_item_ids(tmp_path):
    vectors = catalog(tmp_path)
    store = run_to(tmp_path, write_config(tmp_path, THREE))
    for name, dtype in (("audio", np.float64), ("video", np.float32), ("lyrics", np.float16)):
        t = store.read_parquet(f"features/{name}.parquet")
        x, ok = arrow_to_vectors(t["vector"])
        ids = np.array([int(i) for i in t["item_id"].to_pylist()])
        assert ok.all() and t["status"].to_pylist() == ["ok"] * N_ITEMS
        np.testing.assert_array_equal(x, vectors[name].astype(dtype)[ids].astype(np.float32))
        meta = store.parquet_metadata(f"features/{name}.parquet")
        assert meta["encoder"] == "imported" and meta["kind"] == "imported" and meta["source"].endswith(
            {"audio": "audio.npy", "video": "video.parquet", "lyrics": "lyrics.npy"}[name])


def test_bad_rows_get_a_status_and_bad_files_an_error_naming_them(tmp_path):
    catalog(tmp_path)
    audio = np.load(tmp_path / "audio.npy")
    audio[5] = np.nan
    audio[7] = 0.0
    np.save(tmp_path / "audio.npy", audio)
    video = pq.read_table(tmp_path / "video.parquet")
    pq.write_table(video.filter(pa.compute.not_equal(video["item_id"], "9")), tmp_path / "video.parquet")
    store = run_to(tmp_path, write_config(tmp_path, {m: THREE[m] for m in ("audio", "video")}))
    status = dict(zip(store.read_parquet("features/audio.parquet")["item_id"].to_pylist(),
                      store.read_parquet("features/audio.parquet")["status"].to_pylist()))
    assert status["5"] == "non_finite" and status["7"] == "zero_vector" and status["6"] == "ok"
    vstatus = dict(zip(*(store.read_parquet("features/video.parquet")[c].to_pylist() for c in ("item_id", "status"))))
    assert vstatus["9"] == "not_in_file"
    counts = json.loads((tmp_path / "w" / "manifest.json").read_text())["stages"]["encode"]["counts"]
    assert counts["audio_non_finite"] == 1 and counts["audio_zero_vector"] == 1 and counts["video_not_in_file"] == 1

    np.save(tmp_path / "audio.npy", audio[:50])  # fewer rows than item ids
    with pytest.raises(StageError, match=r"audio.npy has 50 rows but the catalog's item ids go up to 59"):
        run_to(tmp_path, write_config(tmp_path, {"audio": THREE["audio"]}))
    np.save(tmp_path / "audio.npy", np.nan_to_num(audio).astype(np.int64))
    with pytest.raises(StageError, match=r"audio.npy holds a 2-D int64 array"):
        run_to(tmp_path, write_config(tmp_path, {"audio": THREE["audio"]}))
    pq.write_table(pa.table({"item_id": ["1", "1"], "vector": [[1.0], [2.0]]}), tmp_path / "video.parquet")
    with pytest.raises(StageError, match=r"video.parquet: item_id '1' appears twice"):
        run_to(tmp_path, write_config(tmp_path, {"video": THREE["video"]}))


def test_npy_needs_row_number_item_ids(tmp_path):
    catalog(tmp_path)
    items = (tmp_path / "items.csv").read_text().replace("\n1,", "\nx1,")
    (tmp_path / "items.csv").write_text(items)
    inter = (tmp_path / "interactions.csv").read_text().replace(",1\n", ",x1\n")
    (tmp_path / "interactions.csv").write_text(inter)
    with pytest.raises(StageError, match=r"not row numbers.*Parquet file with item_id \+ vector"):
        run_to(tmp_path, write_config(tmp_path, {"audio": THREE["audio"]}))


def test_changing_an_imported_file_reruns_encode(tmp_path):
    catalog(tmp_path)
    config = write_config(tmp_path, {"audio": THREE["audio"]})
    run_to(tmp_path, config)
    np.save(tmp_path / "audio.npy", np.load(tmp_path / "audio.npy") * 2)
    state = Runner(STAGES, load_config(config), tmp_path / "w", console=QUIET).status()["encode"]
    assert state.state == "stale" and "audio.npy" in state.reason


# ---- three modalities end to end -------------------------------------------------------------
def test_three_modalities_run_to_a_served_index(tmp_path):
    vectors = catalog(tmp_path)
    store = run_to(tmp_path, write_config(tmp_path, THREE), to="index")
    names = ["audio", "video", "lyrics"]
    for m in names:
        assert store.exists(f"features/{m}.parquet") and store.exists(f"features/{m}_clear.parquet")
    info = store.read_json("clear/projector.json")
    assert info["applied"] and info["modalities"] == names and set(info["inputs"]) == set(names)
    assert set(info["energy_removed"]) == {"audio|video", "audio|lyrics", "video|lyrics"}

    # the projected files are the M = 3 projector applied to the imported vectors
    tensors, _ = store.read_tensors("clear/projector.safetensors")
    proj = MultiClearProjector.from_state(tensors, info)
    raw = {m: arrow_to_vectors(store.read_parquet(f"features/{m}.parquet")["vector"])[0] for m in names}
    ref = MultiClearProjector(ClearOptions(k=3), names).fit({m: x.astype(np.float64) for m, x in raw.items()})
    for m in names:
        got = arrow_to_vectors(store.read_parquet(f"features/{m}_clear.parquet")["vector"])[0]
        np.testing.assert_allclose(got, proj.transform(m, raw[m]), rtol=1e-5, atol=1e-5 * np.abs(raw[m]).max())
        np.testing.assert_allclose(proj.directions_[m] @ proj.directions_[m].T,
                                   ref.directions_[m] @ ref.directions_[m].T, atol=1e-4)  # fit in float32 chunks
    assert vectors  # the planted data made it through

    diag = store.read_json("clear/diagnostics.json")
    assert set(diag["pairs"]) == set(diag["pairwise"]) == {"audio|video", "audio|lyrics", "video|lyrics"}
    for pair, d in diag["pairs"].items():
        assert d["modalities"] == pair.split("|") and d["spectrum_after"][0] < d["spectrum_before"][0]
        assert set(d["similarity_density"]) == set(pair.split("|"))

    model = store.read_json("model/model.json")
    assert set(model["features"]) == set(names)
    content = store.read_json("index/index_info.json")["content"]
    assert [b["modality"] for b in content["blocks"]] == names and content["features"] == "raw"
    assert {b["kind"] for b in content["blocks"]} == {"imported"}

    html, _ = (p.read_text() for p in write_report(tmp_path / "w"))
    assert all(pair in html for pair in ("audio - video", "audio - lyrics", "video - lyrics"))  # the pairwise table

    rec = clearrec.open(tmp_path / "w")
    hits = rec.similar("0", 5)
    assert len(hits) == 5 and "0" not in [h.item_id for h in hits]
    assert len(rec.recommend("u0", 5)) == 5
    with pytest.raises(ArtifactError, match="no modality with a text encoder"):
        rec.search_text("anything")


def test_a_modality_can_be_left_unprojected_and_dropped(tmp_path):
    catalog(tmp_path)
    config = write_config(tmp_path, THREE, project={"modalities": {"video": False}})
    store = run_to(tmp_path, config, to="project")
    assert store.read_json("clear/projector.json")["project"] == {"audio": True, "video": False, "lyrics": True}
    raw = arrow_to_vectors(store.read_parquet("features/video.parquet")["vector"])[0]
    np.testing.assert_array_equal(arrow_to_vectors(store.read_parquet("features/video_clear.parquet")["vector"])[0],
                                  raw)
    with pytest.raises(StageError, match=r"project.modalities names \['sound'\]"):
        run_to(tmp_path, write_config(tmp_path, THREE, project={"modalities": {"sound": False}}), to="project")
    store = run_to(tmp_path, write_config(tmp_path, {m: THREE[m] for m in ("audio", "video")}), to="project")
    assert not store.exists("features/lyrics.parquet") and not store.exists("features/lyrics_clear.parquet")
    assert store.read_json("clear/projector.json")["modalities"] == ["audio", "video"]


# ---- M = 2 is exactly the two-modality CLEAR -------------------------------------------------
@pytest.mark.slow
def test_two_modalities_project_exactly_as_the_two_modality_clear_on_the_sample(tmp_path):
    shutil.copytree(REPO / "sample_data", tmp_path / "sample")
    config = tmp_path / "sample" / "clearrec.toml"
    store = run_to(tmp_path, config, to="project", overrides=("encode.threads=1",))
    raw = {m: arrow_to_vectors(store.read_parquet(f"features/{m}.parquet")["vector"]) for m in ("image", "text")}
    both = raw["image"][1] & raw["text"][1]
    x = {m: raw[m][0][both].astype(np.float64) for m in raw}
    pair = ClearProjector(ClearOptions(k=8)).fit(x["image"], x["text"])
    multi = MultiClearProjector(ClearOptions(k=8), ["image", "text"]).fit(x)
    np.testing.assert_allclose(multi.transform("image", x["image"]), pair.transform_visual(x["image"]), rtol=0, atol=1e-10)
    np.testing.assert_allclose(multi.transform("text", x["text"]), pair.transform_text(x["text"]), rtol=0, atol=1e-10)
    # the stage's files (float32) are that projection of the encoded features
    for m, fn in (("image", pair.transform_visual), ("text", pair.transform_text)):
        got = arrow_to_vectors(store.read_parquet(f"features/{m}_clear.parquet")["vector"])[0][both]
        np.testing.assert_allclose(got, fn(x[m]), atol=2e-6)
