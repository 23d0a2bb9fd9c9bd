"""clearrec.open(): recommend / similar / search / add_items, integrity checks, and `clearrec query`."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from serving_data import THEMES, PaletteEncoder, attach_vbpr, build_workdir, png
from typer.testing import CliRunner

import clearrec
from clearrec.models.clear_multi import MultiClearProjector
from clearrec.models.encoders import load_text_encoder
from clearrec.models.images import safe_open_image
from clearrec.pipeline.api import UnknownIdError
from clearrec.pipeline.cli import app
from clearrec.pipeline.config import Config
from clearrec.pipeline.errors import ArtifactError, EncoderUnavailableError, IntegrityError
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors
from clearrec.stages import index as index_stage
from clearrec.stages.train import load_model
from conftest import SAMPLE_DATA


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def built(tmp_path_factory, text_encoder):
    root = tmp_path_factory.mktemp("workdir")
    truth = build_workdir(root, text_encoder)
    Runner([index_stage.SPEC], Config(), root).run()
    return root, truth


@pytest.fixture
def rec(built, text_encoder):
    return clearrec.open(built[0], encoders={"text": text_encoder, "image": PaletteEncoder()})


def theme_share(hits, truth, theme: int) -> float:
    return float(np.mean([truth["theme"][truth["ids"].index(h.item_id)] == theme for h in hits]))


# ---- recommend ---------------------------------------------------------------------------
def test_recommend_excludes_seen_and_matches_full_ranking(rec, built):
    _, truth = built
    seen: dict[int, set[int]] = {}
    for u, i, _ in truth["interactions"]:
        seen.setdefault(u, set()).add(i)
    for u, user_id in enumerate(truth["user_ids"]):
        scores = truth["items"] @ truth["users"][u]  # (N,) the model's own full ranking
        ranking = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in seen[u]][:20]
        hits = rec.recommend(user_id, k=20)
        assert [h.item_id for h in hits] == [truth["ids"][i] for i in ranking]
        np.testing.assert_allclose([h.score for h in hits], scores[ranking], rtol=1e-5)
        assert [h.title for h in hits] == [truth["titles"][i] for i in ranking]


def test_recommend_with_seen_items_is_the_plain_top_k(rec, built):
    _, truth = built
    leaked = 0
    for u, user_id in enumerate(truth["user_ids"]):
        top = np.argsort(-(truth["items"] @ truth["users"][u]), kind="stable")[:10]
        assert [h.item_id for h in rec.recommend(user_id, 10, exclude_seen=False)] == [truth["ids"][i] for i in top]
        seen = {i for uu, i, _ in truth["interactions"] if uu == u}
        leaked += bool(seen & set(top.tolist()))
    assert leaked > 0  # so the exclusion test above is not vacuous


def test_unknown_ids_bad_k_and_wrong_knob_are_errors(rec):
    with pytest.raises(UnknownIdError, match="unknown user 'nobody'") as e:
        rec.recommend("nobody")
    assert isinstance(e.value, KeyError)
    with pytest.raises(UnknownIdError, match="unknown item"):
        rec.similar("no-such-item")
    for k in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            rec.recommend("user00", k=k)
    with pytest.raises(ValueError, match="efSearch applies to HNSW"):
        rec.recommend("user00", ef_search=64)  # the sample index is exact (Flat)


# ---- content -----------------------------------------------------------------------------
def test_similar_returns_same_theme_neighbours_without_the_item(rec, built):
    _, truth = built
    for item in ("item000", "item070", "item175"):
        hits = rec.similar(item, k=10)
        assert item not in [h.item_id for h in hits]
        assert theme_share(hits, truth, truth["theme"][truth["ids"].index(item)]) >= 0.9
    cf = rec.similar("item000", k=10, source="cf")
    assert "item000" not in [h.item_id for h in cf] and theme_share(cf, truth, 0) >= 0.9


@pytest.mark.parametrize("query, theme", [("jogging stroller for running", 4), ("glass baby bottle", 1),
                                          ("silicone teether", 5)])
def test_search_text_finds_the_theme(rec, built, query, theme):
    hits = rec.search_text(query, k=5)
    assert theme_share(hits, built[1], theme) == 1.0
    assert all(-1.0 <= h.score <= 1.0 + 1e-5 for h in hits)  # text block alone: a cosine


def test_search_image_from_bytes_and_path(rec, built, tmp_path):
    for theme in range(len(THEMES)):
        assert theme_share(rec.search_image(png(theme), k=10), built[1], theme) >= 0.9
    path = tmp_path / "query.png"
    path.write_bytes(png(3))
    assert [h.item_id for h in rec.search_image(path, k=5)] == [h.item_id for h in rec.search_image(png(3), k=5)]


def test_query_images_are_guarded_like_catalog_images(built, text_encoder):
    capped = clearrec.open(built[0], encoders={"text": text_encoder, "image": PaletteEncoder()}, max_image_pixels=100)
    with pytest.raises(ValueError, match="exceeds the cap") as e:
        capped.search_image(png(0, size=24))  # 576 pixels > 100
    assert e.value.code == "decompression_bomb"
    rec = clearrec.open(built[0], encoders={"text": text_encoder, "image": PaletteEncoder()})
    with pytest.raises(ValueError) as e:
        rec.search_image(png(0)[:60])
    assert e.value.code in ("truncated", "corrupt")
    with pytest.raises(ValueError) as e:
        rec.search_image(b"%PDF-1.4 not an image")
    assert e.value.code == "unsupported_format"


def test_query_encoder_must_be_the_catalogs(built):
    with pytest.raises(EncoderUnavailableError, match="not the one the catalog was encoded with"):
        clearrec.open(built[0], encoders={"image": load_text_encoder("all-MiniLM-L6-v2")})
    rec = clearrec.open(built[0])  # the image block's encoder identity cannot be loaded
    with pytest.raises(EncoderUnavailableError):
        rec.search_image(png(0))


# ---- cold start --------------------------------------------------------------------------
def test_add_items_enters_the_content_index_and_says_cf_is_not_updated(rec, built):
    _, truth = built
    (built[0] / "catalog" / "new.png").write_bytes(png(4))
    with pytest.warns(UserWarning, match="no content pathway"):
        added = rec.add_items([
            {"item_id": "new-stroller", "title": "three-wheel jogging stroller", "description": "for trails",
             "image": "new.png"},
            {"item_id": "new-blanket", "title": "organic muslin swaddle blanket", "image": png(2)},
            {"item_id": "new-textonly", "title": "wide-neck glass baby bottle"},
        ])
    assert added.content == 3 and added.cf == 0 and "lightgcn" in added.notes[0]
    assert theme_share(rec.similar("new-stroller", k=10), truth, 4) >= 0.9
    assert theme_share(rec.similar("new-blanket", k=10), truth, 2) >= 0.9
    assert theme_share(rec.similar("new-textonly", k=5), truth, 1) >= 0.8
    assert "new-stroller" in [h.item_id for h in rec.search_image(png(4), k=40)]
    assert rec.search_text("three-wheel jogging stroller", k=3)[0].title == "three-wheel jogging stroller"
    assert "new-stroller" not in [h.item_id for h in rec.recommend("user00", k=1000)]


def test_add_items_with_vbpr_uses_its_content_pathway_for_the_cf_index(built, text_encoder, tmp_path):
    root = _copy(built, tmp_path)
    attach_vbpr(root)
    Runner([index_stage.SPEC], Config(), root).run(force=True)
    rec = clearrec.open(root, encoders={"text": text_encoder, "image": PaletteEncoder()})
    rows = [{"item_id": "n1", "title": "all-terrain jogging stroller", "image": png(4)},
            {"item_id": "n2", "title": "glass baby bottle", "description": "slow flow"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        added = rec.add_items(rows)
    assert added.cf == 2 and added.content == 2 and added.notes == []
    assert not [w for w in caught if "content pathway" in str(w.message)]

    store = ArtifactStore(root)
    tensors, _ = store.read_tensors("clear/projector.safetensors")
    proj = MultiClearProjector.from_state(tensors, store.read_json("clear/projector.json"))
    texts = ["all-terrain jogging stroller.", "glass baby bottle. slow flow"]  # "{title}. {description}", as encode
    text = proj.transform("text", text_encoder.encode(texts))
    image = proj.transform("image", PaletteEncoder().encode([safe_open_image(png(4))]))
    fill = arrow_to_vectors(store.read_parquet("features/image_clear.parquet")["vector"])[0][built[1]["img_valid"]]
    image = np.concatenate([image, fill.mean(0, keepdims=True)])  # n2 has no image: filled like the catalog
    model = load_model(store)
    expected = model.content_item_vectors({"image": torch.from_numpy(image), "text": torch.from_numpy(text)}).numpy()
    got = np.stack([rec.items.index.reconstruct(rec.items.row_of[i]) for i in ("n1", "n2")])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    user = rec._user_vectors[rec._user_row["user00"]]
    scores = {h.item_id: h.score for h in rec.recommend("user00", k=1000, exclude_seen=False)}
    assert scores["n1"] == pytest.approx(float(user @ expected[0]), rel=1e-4)
    assert rec.similar("n1", k=3, source="cf")


def test_add_items_rejects_bad_rows(rec, built):
    with pytest.raises(ValueError, match="new, distinct"):
        rec.add_items([{"item_id": "item001", "title": "duplicate of the catalog"}])
    with pytest.raises(ValueError, match="new, distinct"):
        rec.add_items([{"item_id": "a", "title": "x"}, {"item_id": "a", "title": "y"}])
    with pytest.raises(ValueError, match="leaves the catalog root"):
        rec.add_items([{"item_id": "b", "title": "x", "image": "../../etc/passwd"}])
    with pytest.raises(ValueError, match="nothing to encode"):
        rec.add_items([{"item_id": "c", "title": "", "description": None}])
    with pytest.raises(ValueError, match="decompression_bomb|exceeds"):
        clearrec.open(built[0], encoders={"image": PaletteEncoder()}, max_image_pixels=10).add_items(
            [{"item_id": "d", "image": png(1)}])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:backbone .* has no content pathway")
def test_searches_stay_consistent_while_items_are_added(rec, built):
    expected = [h.item_id for h in rec.recommend("user01", k=20)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert [h.item_id for h in rec.recommend("user01", k=20)] == expected
                assert len(rec.similar("item010", k=20)) == 20
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        rec.add_items([{"item_id": f"bulk{i}", "title": f"soft cotton swaddle blanket batch {i}", "image": png(2)}])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert rec.content.index.ntotal == 180 + 20


# ---- integrity ---------------------------------------------------------------------------
def test_vbpr_content_pathway_in_the_old_two_modality_form_asks_to_retrain(built, tmp_path):
    from clearrec.pipeline._serving import load_content_pathway

    root = _copy(built, tmp_path)
    attach_vbpr(root)
    store = ArtifactStore(root)
    assert load_content_pathway(store).modalities == ("image", "text")
    meta = store.read_json("model/model.json")
    dims = meta["content_pathway"].pop("dims")
    meta["content_pathway"] |= {"text_dim": dims["text"], "image_dim": dims["image"]}
    store.write_json("model/model.json", meta)
    with pytest.raises(ArtifactError, match="older form.*rerun 'clearrec run --only train'"):
        load_content_pathway(store)


def _copy(built, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(built[0], target)
    return target


@pytest.mark.parametrize("name", ["index/items.faiss", "index/content.faiss", "index/items_ids.parquet",
                                  "index/index_info.json"])
def test_a_modified_index_artifact_refuses_to_load(built, tmp_path, name):
    root = _copy(built, tmp_path)
    path = root / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        clearrec.open(root)


def test_checksum_is_checked_without_a_manifest_and_for_the_projector(built, tmp_path, text_encoder):
    root = _copy(built, tmp_path)
    (root / "manifest.json").unlink()
    assert clearrec.open(root).num_items == 180
    path = root / "clear" / "projector.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    rec = clearrec.open(root, encoders={"text": text_encoder, "image": PaletteEncoder()})
    with pytest.raises(IntegrityError):  # new items are projected as the catalog's *_clear features were
        rec.add_items([{"item_id": "new", "title": "stroller"}])
    faiss_file = root / "index" / "items.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes() + b"\0")
    with pytest.raises(IntegrityError):
        clearrec.open(root)


# ---- clearrec query ----------------------------------------------------------------------
def test_query_cli_json_and_table(built, rec, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no clearrec.toml here: --workdir alone is enough
    runner = CliRunner()
    root = str(built[0])
    res = runner.invoke(app, ["query", "--workdir", root, "--user", "user02", "-k", "7", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [h.to_dict() for h in rec.recommend("user02", 7)]
    res = runner.invoke(app, ["query", "--workdir", root, "--item", "item033", "--json"])
    assert json.loads(res.stdout) == [h.to_dict() for h in rec.similar("item033", 20)]
    res = runner.invoke(app, ["query", "--workdir", root, "--text", "baby bottle", "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [h.to_dict() for h in rec.search_text("baby bottle", 3)]
    res = runner.invoke(app, ["query", "--workdir", root, "--user", "user02", "-k", "3"])
    assert res.exit_code == 0 and rec.recommend("user02", 1)[0].title in res.stdout
    res = runner.invoke(app, ["query", "--workdir", root, "--user", "user02", "--text", "x"])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = runner.invoke(app, ["query", "--workdir", root, "--user", "user02", "-k", "1001"])
    assert res.exit_code == 2


@pytest.mark.slow
def test_query_cli_reports_unknown_ids_as_errors(built, tmp_path):
    res = subprocess.run([sys.executable, "-m", "clearrec", "query", "--workdir", str(built[0]), "--user", "nobody"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    assert "unknown user 'nobody'" in res.stderr and "Traceback" not in res.stderr


# ---- the real pipeline on sample_data ----------------------------------------------------
@pytest.fixture(scope="module")
def sample_workdir(tmp_path_factory):
    """The whole sample pipeline (ingest .. index), 2 training epochs, real encoders."""
    from clearrec.pipeline.config import load_config
    from clearrec.pipeline.registry import STAGES, stage_names

    missing = {"ingest", "encode", "project", "train", "index"} - set(stage_names())
    if missing:
        pytest.skip(f"stages {sorted(missing)} are not registered in pipeline/registry.py")
    cfg = load_config(SAMPLE_DATA / "clearrec.toml").with_overrides(
        {"train.epochs": 2, "train.patience": 2, "train.threads": 1})
    root = tmp_path_factory.mktemp("sample") / "work"
    Runner(STAGES, cfg, root).run()
    return root


@pytest.mark.slow
def test_sample_pipeline_serves_sensible_results(sample_workdir):
    import pyarrow.parquet as pq

    from clearrec.models.metrics import ItemSets

    rec = clearrec.open(sample_workdir)
    store = ArtifactStore(sample_workdir)
    model = load_model(store)  # the trained model's own full ranking, every interaction masked
    inter = pq.read_table(sample_workdir / "interactions.parquet", columns=["user_idx", "item_idx"])
    seen = ItemSets.from_pairs(torch.from_numpy(inter["user_idx"].to_numpy().copy()),
                               torch.from_numpy(inter["item_idx"].to_numpy().copy()), model.num_users, model.num_items)
    user_ids = pq.read_table(sample_workdir / "users.parquet").sort_by("user_idx")["user_id"].to_pylist()
    item_ids = pq.read_table(sample_workdir / "items.parquet").sort_by("item_idx")["item_id"].to_pylist()
    users = torch.arange(0, model.num_users, 7)
    scores, top = model.recommend(users, 10, exclude=seen)  # (B, 10)
    for u, s_row, i_row in zip(users.tolist(), scores.tolist(), top.tolist()):
        hits = rec.recommend(user_ids[u], 10)
        assert [h.item_id for h in hits] == [item_ids[i] for i in i_row]
        np.testing.assert_allclose([h.score for h in hits], s_row, rtol=1e-4)

    with open(SAMPLE_DATA / "attributes.csv", newline="") as f:
        attrs = {r["item_id"]: r for r in csv.DictReader(f)}
    hit = rec.search_image(SAMPLE_DATA / "images" / "P0002.jpg", k=5)[0]
    assert hit.item_id == "P0002" and hit.score == pytest.approx(1.0, abs=1e-4)  # same encoder + projector
    for query, words in (("bamboo kite", ("Bamboo", "Kite")), ("steel wall clock", ("Steel", "Clock"))):
        assert all(any(w in h.title for w in words) for h in rec.search_text(query, k=5)), query
    fields = ("category", "material", "brand", "colour", "pattern")  # the planted attributes

    def shared(a: str, b: str) -> int:
        return sum(attrs[a][f] == attrs[b][f] for f in fields)

    ids = rec.content.item_ids
    chance = np.mean([shared(a, b) for a, b in itertools.combinations(ids, 2)])
    neighbours = np.mean([shared(a, h.item_id) for a in ids[::20] for h in rec.similar(a, k=10)])
    assert neighbours > 2 * chance, (neighbours, chance)  # content neighbours share planted attributes
