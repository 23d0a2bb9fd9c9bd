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
from clearrec.pipeline.report import WORKDIR_SECTIONS, write_report
from clearrec.pipeline.store import ArtifactStore, vectors_to_arrow
from PIL import Image

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
        "content_sha256": ["x"] * n_items}), metadata={"modality": "text", "encoder": "all-MiniLM-L6-v2", "dim": d})
    s.write_parquet("features/text_clear.parquet", pa.table({"item_idx": np.arange(n_items)}),
                    metadata={"clear_enabled": True})
    s.write_json("clear/projector.json", {"k": 2, "strength": 1.0, "energy_removed": 0.42, "dims": [4, 4]})
    s.write_json("clear/diagnostics.json", {"spectrum_before": list(np.linspace(1, 0, 20)), "overlap@10": 0.31})
    s.write_bytes("clear/spectrum.png", _png((10, 10, 200)))
    s.write_json("model/metrics.json", {"valid": {"recall@20": 0.2, "ndcg@20": 0.1},
                                        "test": {"recall@10": 0.15, "recall@20": 0.25, "ndcg@10": 0.05,
                                                 "ndcg@20": 0.08}, "best_epoch": 4})
    s.write_json("model/model.json", {"backbone": "lightgcn", "params": {"layers": 2}})
    s.write_bytes("model/training_curve.png", _png((10, 150, 10)))
    s.write_parquet("model/item_vectors.parquet", pa.table({
        "item_idx": np.arange(n_items), "item_id": [f"i{i}" for i in range(n_items)],
        "vector": vectors_to_arrow(np.eye(n_items, d, dtype=np.float32))}))
    uvec = np.array([[5, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    s.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": np.arange(n_users), "user_id": ["u0", "u1", "u2"], "vector": vectors_to_arrow(uvec)}))
    s.write_json("index/index_info.json", {"items": {"factory": "Flat", "recall@20": 1.0}})
    s.write_json("manifest.json", {"stages": {"ingest": {"status": "ok", "seconds": 0.5, "counts": {"items": 6}},
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
    assert "energy_removed" in html and "20 values" in html and "overlap@10" in html
    assert "encode" in html and "failed: boom" in html
    assert "![spectrum](clear/spectrum.png)" in md and "![training curve](model/training_curve.png)" in md


def test_recommendations_mask_training_items_and_mark_hits(workdir):
    md = write_report(workdir)[1].read_text()
    user0 = md.split("user 0:")[1].split("user 1:")[0]
    first = [line for line in user0.splitlines() if line.startswith("| 1 |")][0]
    assert "Item <0>" in first and "hit" in first  # top score of user 0 is item 0, a test item
    assert "Item <2>" not in user0  # item 2 is user 0's training item: masked


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
    _, md_path = write_report(workdir, out_dir=tmp_path / "elsewhere")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    assert links and all((md_path.parent / link).is_file() for link in links)


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
