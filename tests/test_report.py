"""Report of a work directory: sections, embedded images, graceful absence, headless-Chromium rendering."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from clearrec.pipeline.report import CAPTIONS, WORKDIR_SECTIONS, workdir_sections, write_report
from clearrec.pipeline.store import ArtifactStore, vectors_to_arrow
from PIL import Image
from report_checks import raw_dumps

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def _png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A work directory holding every artifact of the contract, with tiny contents."""
    catalog = tmp_path / "catalog"
    (catalog / "img").mkdir(parents=True)
    (catalog / "img" / "0.png").write_bytes(_png((200, 30, 30), 300))
    (tmp_path / "secret.png").write_bytes(_png((0, 0, 0)))  # outside the catalog root
    s = ArtifactStore(tmp_path / "work")
    n_items, n_users, d = 6, 3, 4
    s.write_parquet("items.parquet", pa.table({
        "item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)],
        "title": [f"Item <{i}>" for i in range(n_items)], "description": [""] * n_items,
        "text": [f"Item {i}" for i in range(n_items)],
        "image": ["img/0.png", "../secret.png", None, "https://example.com/x.jpg", None, None]}),
        metadata={"catalog_root": str(catalog), "source": "test"})
    s.write_parquet("users.parquet", pa.table({"user_idx": np.arange(n_users), "user_id": ["u0", "u1", "u2"]}))
    pairs = [(0, 2, "train"), (0, 0, "test"), (0, 1, "test"), (1, 3, "train"), (1, 4, "valid"), (1, 5, "test"),
             (2, 0, "train")]
    s.write_parquet("interactions.parquet", pa.table({
        "user_idx": [p[0] for p in pairs], "item_idx": [p[1] for p in pairs], "timestamp": [None] * len(pairs),
        "rating": [None] * len(pairs), "split": [p[2] for p in pairs]},
        schema=pa.schema([("user_idx", pa.int64()), ("item_idx", pa.int64()), ("timestamp", pa.int64()),
                          ("rating", pa.float64()), ("split", pa.string())])))
    s.write_parquet("rejects.parquet", pa.table({"source": ["interactions"], "row": [7], "reason": ["unknown item"]}))
    vec = np.random.default_rng(0).normal(size=(n_items, d)).astype(np.float32)
    s.write_parquet("features/text.parquet", pa.table({
        "item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)],
        "vector": vectors_to_arrow(vec), "status": ["ok"] * 5 + ["empty_text"], "error": [None] * n_items,
        "content_sha256": ["x"] * n_items}), metadata={"modality": "text", "encoder": "all-MiniLM-L6-v2", "dim": d,
                                                       "untrained": False})
    s.write_parquet("features/text_clear.parquet", pa.table({"item_idx": np.arange(n_items)}),
                    metadata={"clear_enabled": True})
    # the JSON artifacts, shaped as the stages write them (long lists, nested dicts, empty lists)
    options = {"k": 2, "k_requested": 2, "strength": 1.0, "mode": "static", "directions": "shared", "fit_on": "all",
               "ratio": None, "center": True}
    s.write_json("clear/projector.json", {
        **options, "applied": True, "enabled": True, "reason": None, "energy_removed": 0.42, "dims": {"visual": 4,
        "text": 4}, "counts": {"fit_items": 6, "missing_image": 0}, "options": options, "fit_seconds": 0.01,
        "transform_seconds": 0.02, "inputs": {"text": {"encoder": "all-MiniLM-L6-v2", "dim": 4, "rows": 6}}})
    s.write_json("clear/diagnostics.json", {
        "spectrum_before": list(np.linspace(1, 0, 20)), "energy_curve_after": list(np.linspace(0, 0.5, 384)),
        "overlap_k": 10, "overlap@10": {"before": 0.31, "after": 0.12, "chance": 0.1},
        "top_singular_values": {"before": [2.0, 1.0], "after": [0.5, 0.25]},
        "variance_kept": {"image": 0.5, "text": 0.75}, "overlap_curve": {"k": [1, 5], "before": [0.1, 0.2]}})
    s.write_bytes("clear/spectrum.png", _png((10, 10, 200)))
    s.write_json("model/metrics.json", {"valid": {"recall@20": 0.2, "ndcg@20": 0.1},
                                        "test": {"recall@10": 0.15, "recall@20": 0.25, "ndcg@10": 0.05,
                                                 "ndcg@20": 0.08, "hit@20": 0.5, "coverage@20": 0.75},
                                        "best_epoch": 4, "history": [{"epoch": 1, "valid": {"recall@20": 0.1}}]})
    s.write_json("model/model.json", {
        "backbone": "lightgcn", "class": "LightGCN", "hyperparameters": {"layers": 2, "reg": 1e-4},
        "num_users": n_users, "num_items": n_items, "vector_dim": d, "features": {},
        "training": {"lr": 0.001, "batch_size": 2048, "max_epochs": 10, "patience": 3, "stop_metric": "recall@20",
                     "eval_ks": [5, 10, 20, 50], "seed": 999, "device": "cpu", "optimizer": "adam",
                     "negatives": "uniform, 1 per positive"},
        "best_epoch": 4, "epochs_run": 7, "stopped_early": True, "interactions_sha256": "e" * 64})
    s.write_bytes("model/training_curve.png", _png((10, 150, 10)))
    s.write_parquet("model/item_vectors.parquet", pa.table({
        "item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)],
        "vector": vectors_to_arrow(np.eye(n_items, d, dtype=np.float32))}))
    uvec = np.array([[5, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    s.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": np.arange(n_users), "user_id": ["u0", "u1", "u2"], "vector": vectors_to_arrow(uvec)}))
    index = {"factory": "HNSW32", "faiss_class": "IndexHNSWFlat", "ntotal": n_items, "dim": d, "bytes": 3 << 20,
             "knob": "efSearch", "knob_value": 48, "recall": 0.97, "recall_by_query": {"user": 0.97},
             "tuning": {"curve": [], "reached": True}, "sha256": "a" * 64}
    s.write_json("index/index_info.json", {"items": index, "recall_k": 20, "recall_target": 0.95})
    s.write_json("manifest.json", {"stages": {
        "ingest": {"status": "ok", "seconds": 0.5, "counts": {"items": 6}, "ended": "2026-12-01T21:16:24.296901+00:00",
                   "parts": {"config": {"ingest": {"split": "random", "seed": 2024, "split_ratios": [0.8, 0.1, 0.1]}}}},
        "encode": {"status": "failed", "error": "boom"}}})
    return s.root


def test_workdir_report_has_every_section_with_embedded_images(workdir):
    html_path, md_path = write_report(workdir)
    html, md = html_path.read_text(), md_path.read_text()
    for sid in WORKDIR_SECTIONS:
        assert f'<section id="{sid}">' in html and f'<a id="{sid}"></a>' in md
    assert "not run:" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(src.startswith("data:image/") for src in srcs)  # self-contained
    assert not re.search(r'(href|src)="(http|file:|/)', html)
    assert "Item &lt;0&gt;" in html  # titles are escaped
    assert "sparsity" in html and "61.1111%" in html  # 1 - 7 / (3 * 6)
    assert "empty_text: 1" in html and "ok: 5" in html and "unknown item" in html
    assert "encode" in html and "failed: boom" in html
    assert "![spectrum](clear/spectrum.png)" in md and "![training curve](model/training_curve.png)" in md
    assert "split: random per user (seed 2024, train/valid/test 0.8/0.1/0.1)" in html


def test_sections_show_headline_numbers_in_words_not_json_dumps(workdir):
    html = write_report(workdir)[0].read_text()
    assert raw_dumps(html) == {}
    sections = {sid: html.split(f'<section id="{sid}">')[1].split("</section>")[0] for sid in WORKDIR_SECTIONS}
    clear = sections["clear"]
    assert "hard null-space projection" in clear and "2, as requested" in clear
    assert "42.0 % of the image-text cross-covariance energy" in clear
    assert "31.0 % before, 12.0 % after (chance 10.0 %)" in clear and "image 50.0 %, text 75.0 %" in clear
    train = sections["training"]
    assert "LightGCN" in train and "3 users x 6 items" in train and "layers 2, reg 0.0001" in train
    assert "best 4 of 7 run on valid recall@20 (stopped early" in train and "none (IDs only)" in train
    assert "Recall@20 0.2500, NDCG@20 0.0800, Hit@20 0.5000, coverage@20 0.7500" in sections["metrics"]
    index = sections["index"]
    assert "HNSW32" in index and "efSearch = 48" in index and "3.0 MiB" in index and "0.9700" in index
    for sid, names in (("clear", ["clear/projector.json", "clear/diagnostics.json"]),
                       ("training", ["model/model.json", "model/metrics.json"]), ("index", ["index/index_info.json"])):
        for name in names:  # the rest is one click away
            assert f'<a href="{name}">' in sections[sid], (sid, name)


def test_raw_dump_check_catches_the_old_key_value_tables():
    dumped = ('<section id="clear"><table><tr><th>key</th><th>value</th></tr><tr><td>counts.fit_items</td><td>398'
              '</td></tr><tr><td>spectrum</td><td>384 values, first 0.003889, ...</td></tr></table></section>')
    expected = ["a key / value table", "counts.fit_items", "384 values, first 0.003889, ..."]
    assert raw_dumps(dumped) == {"clear": expected}


def test_untrained_and_imported_encoders_get_a_notice(workdir):
    html, md = (p.read_text() for p in write_report(workdir))
    assert 'class="notice"' not in html and "Notice" not in md
    s = ArtifactStore(workdir)
    table = s.read_parquet("features/text.parquet")
    s.write_parquet("features/image.parquet", table, metadata={"modality": "image", "encoder": "open_clip-untrained:"
                                                               "ViT-S-32?seed=0", "dim": 4, "untrained": True})
    s.write_parquet("features/text.parquet", table, metadata={"modality": "text", "encoder": "imported", "dim": 4,
                                                              "untrained": False, "source": "/data/text_feat.npy"})
    html, md = (p.read_text() for p in write_report(workdir))
    notices = re.findall(r'<div class="notice" role="alert">(.*?)</div>', html)
    assert len(notices) == 2 and html.index('class="notice"') < html.index('<section id="dataset">')  # at the top
    assert "image encoder (open_clip-untrained:ViT-S-32?seed=0) is untrained" in notices[0]
    assert "encode.modalities.image.encoder" in notices[0]
    assert "text features were imported (/data/text_feat.npy)" in notices[1]
    assert md.count("> **Notice:**") == 2


def test_figures_have_sentences_and_timestamps_do_not_wrap(workdir):
    html, md = (p.read_text() for p in write_report(workdir))
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert captions == [CAPTIONS["spectrum.png"], CAPTIONS["training_curve.png"]]
    assert all(len(c.split()) >= 10 and c.endswith(".") for c in captions)
    assert f"*{CAPTIONS['spectrum.png']}*" in md
    assert '<td class="nowrap">2026-12-01 21:16:24 UTC</td>' in html


def test_recommendations_mask_training_items_and_mark_hits(workdir):
    md = write_report(workdir)[1].read_text()
    user0 = md.split("user u0 (user_idx 0):")[1].split("user u1")[0]
    assert user0.startswith(" 1 training item, 2 test items, 2 of them in the top 10\n")
    first = [line for line in user0.splitlines() if line.startswith("| 1 |")][0]
    assert "| i0 | Item <0> |" in first and "test item (hit)" in first  # user 0's top item is item 0, a test item
    assert "Item <2>" not in user0  # item 2 is user 0's training item: masked
    assert "2 of the 2 users with held-out test items have at least one in their top 10" in md


def test_example_users_with_a_hit_come_first(workdir):
    s = ArtifactStore(workdir)
    pairs = [(0, 2, "train"), (0, 0, "test"), (0, 1, "test"), (1, 3, "train"), (1, 0, "test"), (2, 0, "train")]
    s.write_parquet("interactions.parquet", pa.table({
        "user_idx": [p[0] for p in pairs], "item_idx": [p[1] for p in pairs], "split": [p[2] for p in pairs]}))
    # user 0's top 1: item 3, no hit; user 1's: item 0, a hit
    uvec = np.array([[0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    s.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": np.arange(3), "user_id": ["u0", "u1", "u2"], "vector": vectors_to_arrow(uvec)}))
    (rec,) = [sec for sec in workdir_sections(workdir, n_users=1, top_k=1) if sec.id == "recommendations"]
    texts = [data for kind, data in rec.blocks if kind == "p"]
    assert texts[0].startswith("1 of the 2 users with held-out test items have at least one in their top 1 ")
    assert texts[1].startswith("user u1 (user_idx 1): 1 training item, 1 test item, 1 of them in the top 1")
    assert len(texts) == 2  # n_users = 1


def test_thumbnails_only_from_inside_the_catalog_root(workdir):
    html = write_report(workdir)[0].read_text()
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(thumbs) == 2  # item 0 in both test users' lists; ../secret.png and the URL are never read
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).size == (64, 64)


def test_absent_artifacts_say_not_run(tmp_path):
    (tmp_path / "empty").mkdir()
    html = write_report(tmp_path / "empty")[0].read_text()
    for sid in WORKDIR_SECTIONS:
        section = html.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "not run" in section, sid


def test_partial_workdir_degrades_per_section(workdir):
    shutil.rmtree(workdir / "model")
    shutil.rmtree(workdir / "index")
    html = write_report(workdir)[0].read_text()
    sections = {sid: html.split(f'<section id="{sid}">')[1].split("</section>")[0] for sid in WORKDIR_SECTIONS}
    for sid in ("training", "metrics", "index", "recommendations"):
        assert "not run" in sections[sid], sid
    for sid in ("dataset", "status", "clear"):
        assert "not run:" not in sections[sid], sid


def test_report_to_other_folder_links_images_relative(workdir, tmp_path):
    html_path, md_path = write_report(workdir, out_dir=tmp_path / "elsewhere")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    assert links and all((md_path.parent / link).is_file() for link in links)
    json_links = re.findall(r"\]\(([^)]+\.json)\)", md_path.read_text())
    hrefs = re.findall(r'href="([^"#]+)"', html_path.read_text())
    assert len(json_links) == len(hrefs) == 6 and set(json_links) == set(hrefs)
    assert all((md_path.parent / link).is_file() and link.startswith("../") for link in hrefs)


def dump_dom(html_path: Path) -> str:
    """The DOM after load in headless Chromium, with a probe counting images that failed to decode."""
    probe = html_path.with_name("probe.html")
    probe.write_text(html_path.read_text().replace(
        "</body>", "<script>window.addEventListener('load',()=>{document.body.dataset.broken="
        "[...document.images].filter(i=>!(i.naturalWidth>0)).length})</script></body>"))
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(workdir):
    dom = dump_dom(write_report(workdir)[0])
    for sid in WORKDIR_SECTIONS:
        assert f'id="{sid}"' in dom
    assert 'data-broken="0"' in dom  # every embedded image decoded
    assert dom.count("<img") == 4  # spectrum, training curve, two thumbnails
