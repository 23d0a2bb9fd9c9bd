"""The encode stage: contract output, per-item failures, resume after kill -9, incremental reruns,
the Ray backend, remote images, pass-through and offline failure."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tomli_w
from encode_fixtures import image_bytes, png_header, tiny_clip_dir, tiny_sentence_dir, write_catalog, write_items
from rich.console import Console

from clearrec.models.encoders import load_image_encoder, safe_open_image
from clearrec.models.text import apply_text_template
from clearrec.pipeline.config import load_config
from clearrec.pipeline.errors import StageError
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors, vectors_to_arrow
from clearrec.stages import encode

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(stderr=True, quiet=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"image": f"local-dir:{tiny_clip_dir(root / 'clip')}", "text": str(tiny_sentence_dir(root / "st"))}


def config(tmp_path: Path, models: dict[str, str], image_encoder: str | None = None, text_encoder: str | None = None,
           text_template: str | None = None, **encode_keys):
    """An ``[encode]`` section with the image and text modality tables ("none": the modality left out)."""
    tables = {"image": {"encoder": image_encoder or models["image"]},
              "text": {"encoder": text_encoder or models["text"]}}
    if text_template is not None:
        tables["text"]["template"] = text_template
    keys = {"threads": 1, "num_workers": 2, "batch_size": 4, **encode_keys,
            "modalities": {m: t for m, t in tables.items() if t["encoder"] != "none"}}
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"encode": keys}))
    return load_config(path)


def run(cfg, workdir: Path, force: bool = False) -> tuple[list[str], dict]:
    runner = Runner([encode.SPEC], cfg, workdir, console=QUIET)
    ran = runner.run(force=force)
    return ran, runner.manifest()["stages"]["encode"]


def features(workdir: Path, modality: str) -> tuple[pa.Table, dict]:
    store = ArtifactStore(workdir)
    return store.read_parquet(f"features/{modality}.parquet"), store.parquet_metadata(f"features/{modality}.parquet")


# ---- the contract and every failure status ------------------------------------------------
def test_features_per_contract_with_a_status_for_every_failure(tmp_path, models):
    cat = tmp_path / "catalog"
    rows = write_catalog(cat, 3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes(90))
    (tmp_path / "catalog-evil").mkdir()
    (tmp_path / "catalog-evil" / "x.png").write_bytes(image_bytes(91))
    (cat / "images" / "link.png").symlink_to(outside / "secret.png")
    (cat / "images" / "alias.png").symlink_to(cat / "images" / "p0001.png")
    (cat / "images" / "empty.png").write_bytes(b"")
    jpeg = image_bytes(92, size=64, fmt="JPEG")
    (cat / "images" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = bytearray(image_bytes(93, size=64))
    png[100:400] = bytes(b ^ 0xFF for b in png[100:400])
    (cat / "images" / "bad.png").write_bytes(bytes(png))
    (cat / "images" / "doc.pdf").write_bytes(b"%PDF-1.7 a document")
    (cat / "images" / "bomb.png").write_bytes(png_header(30_000, 30_000))
    cases = {
        "images/alias.png": "ok", "images/gone.png": "missing", "images/empty.png": "zero_byte",
        "images/trunc.jpg": "truncated", "images/bad.png": "corrupt", "images/doc.pdf": "unsupported_format",
        "images/bomb.png": "decompression_bomb", "../outside/secret.png": "path_escape",
        "images/link.png": "path_escape", "../catalog-evil/x.png": "path_escape", None: "no_image",
        "http://127.0.0.1:9/x.png": "remote_disabled", "ftp://127.0.0.1/x.png": "unsupported_url",
    }
    for i, ref in enumerate(cases):
        rows.append({"item_id": f"F{i}", "title": f"failure case {i}", "description": "", "image": ref})
    rows.append({"item_id": "BLANK", "title": "", "description": " ", "image": "images/p0002.png"})
    write_items(tmp_path / "w", rows, cat)

    ran, entry = run(config(tmp_path, models), tmp_path / "w")
    assert ran == ["encode"]
    image, meta = features(tmp_path / "w", "image")
    assert image.schema.names == ["item_idx", "item_id", "vector", "status", "error", "content_sha256", "truncated"]
    assert image.schema.field("vector").type == pa.list_(pa.float32(), 16)
    assert image.column("item_idx").to_pylist() == list(range(len(rows)))
    assert image.column("item_id").to_pylist() == [r["item_id"] for r in rows]
    assert meta["modality"] == "image" and meta["dim"] == 16 and meta["normalized"] is True
    assert meta["encoder"] == models["image"] and meta["untrained"] is False and "Resize" in meta["preprocess"]
    status = image.column("status").to_pylist()
    assert status[3:3 + len(cases)] == list(cases.values())
    vectors, valid = arrow_to_vectors(image.column("vector"))
    assert valid.tolist() == [s == "ok" for s in status]
    errors = image.column("error").to_pylist()
    assert all((e is None) == (s == "ok") for s, e in zip(status, errors))
    np.testing.assert_allclose(np.linalg.norm(vectors[valid], axis=1), 1.0, atol=1e-5)
    # vectors are the encoder's, content hashes are of the file bytes
    enc = load_image_encoder(models["image"])
    np.testing.assert_allclose(vectors[1], enc.encode([safe_open_image(cat / "images" / "p0001.png")])[0], atol=1e-5)
    np.testing.assert_array_equal(vectors[3], vectors[1])  # the in-root symlink has the same bytes
    sha = image.column("content_sha256").to_pylist()
    assert sha[0] == hashlib.sha256((cat / "images" / "p0000.png").read_bytes()).hexdigest()

    text, tmeta = features(tmp_path / "w", "text")
    assert tmeta["modality"] == "text" and tmeta["dim"] == 32 and tmeta["text_template"] == "{title}. {description}"
    assert text.column("status").to_pylist() == ["ok"] * (len(rows) - 1) + ["empty_text"]
    expected = apply_text_template("{title}. {description}", rows[0])
    assert text.column("content_sha256")[0].as_py() == hashlib.sha256(expected.encode()).hexdigest()

    counts = entry["counts"]
    assert counts["image_ok"] == 5 and counts["image_path_escape"] == 3 and counts["image_decompression_bomb"] == 1
    assert counts["image_encoded"] == 3 and counts["image_duplicates"] == 2
    assert counts["text_ok"] == len(rows) - 1 and counts["text_empty_text"] == 1


def test_unreadable_files_and_failing_preprocessing_are_per_item(tmp_path, models, monkeypatch):
    from clearrec.models.encoders import ClipImageEncoder

    rows = write_catalog(tmp_path / "cat", 3)
    (tmp_path / "cat" / "images" / "odd.png").write_bytes(image_bytes(50, size=7))
    rows.append({"item_id": "ODD", "title": "odd", "image": "images/odd.png"})
    write_items(tmp_path / "w", rows, tmp_path / "cat")
    locked = str((tmp_path / "cat" / "images" / "p0001.png").resolve())

    os_open = os.open

    def guarded_open(path, *args, **kwargs):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return os_open(path, *args, **kwargs)

    preprocess = ClipImageEncoder.preprocess

    def picky(self, image):
        if image.size == (7, 7):
            raise ValueError("too small to crop")
        return preprocess(self, image)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(ClipImageEncoder, "preprocess", picky)
    run(config(tmp_path, models, text_encoder="none"), tmp_path / "w")
    image, _ = features(tmp_path / "w", "image")
    assert image.column("status").to_pylist() == ["ok", "unreadable", "ok", "preprocess_error"]
    assert "too small to crop" in image.column("error")[3].as_py()


# ---- rerun / config change -----------------------------------------------------------------
def test_rerun_is_a_no_op_and_a_new_text_encoder_reruns(tmp_path, models):
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 6), tmp_path / "cat")
    cfg = config(tmp_path, models)
    assert run(cfg, tmp_path / "w")[0] == ["encode"]
    assert run(cfg, tmp_path / "w")[0] == []
    changed = cfg.with_overrides({"encode.modalities.text.encoder": f"clip-text:{models['image']}"})
    state = Runner([encode.SPEC], changed, tmp_path / "w", console=QUIET).status()["encode"]
    assert state.state == "stale" and "encode.modalities.text.encoder" in state.reason
    ran, entry = run(changed, tmp_path / "w")
    assert ran == ["encode"] and entry["counts"]["image_encoded"] == 0  # images come from the cache
    assert features(tmp_path / "w", "text")[1]["encoder"].startswith("clip-text:local-dir:")


def test_cached_vectors_are_not_reused_across_library_versions(tmp_path, models, monkeypatch):
    from clearrec.stages import _encode_cache

    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 4), tmp_path / "cat")
    cfg = config(tmp_path, models, text_encoder="none")
    run(cfg, tmp_path / "w")
    assert run(cfg, tmp_path / "w", force=True)[1]["counts"]["image_encoded"] == 0
    monkeypatch.setattr(_encode_cache, "_version", lambda name: "9.9" if name == "torch" else "1.0")
    assert run(cfg, tmp_path / "w", force=True)[1]["counts"]["image_encoded"] == 4


def test_files_of_a_local_encoder_folder_are_fingerprinted(tmp_path, models):
    import shutil

    folder = shutil.copytree(models["text"], tmp_path / "st")
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 3), tmp_path / "cat")
    cfg = config(tmp_path, {**models, "text": "st"})  # relative to the config file's folder
    run(cfg, tmp_path / "w")
    assert features(tmp_path / "w", "text")[1]["encoder"] == f"sentence-transformers:{folder.resolve()}"
    with open(folder / "modules.json", "a") as f:
        f.write("\n")
    state = Runner([encode.SPEC], cfg, tmp_path / "w", console=QUIET).status()["encode"]
    assert state.state == "stale" and "modules.json" in state.reason


def test_none_writes_no_file_and_removes_a_stale_one(tmp_path, models):
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 3), tmp_path / "cat")
    run(config(tmp_path, models), tmp_path / "w")
    run(config(tmp_path, models, image_encoder="none"), tmp_path / "w")
    assert not (tmp_path / "w" / "features" / "image.parquet").exists()
    assert (tmp_path / "w" / "features" / "text.parquet").exists()


def test_imported_features_pass_through(tmp_path, models):
    store = write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 4), tmp_path / "cat")
    vectors = np.random.default_rng(0).random((4, 5), dtype=np.float32)
    valid = np.array([True, True, False, True])
    table = pa.table({"item_idx": pa.array(range(4), pa.int64()), "item_id": [f"P{i:04d}" for i in range(4)],
                      "vector": vectors_to_arrow(vectors, valid), "status": ["ok", "ok", "missing", "ok"],
                      "error": [None, None, "not in text_feat.npy", None], "content_sha256": [None] * 4})
    store.write_parquet("imported/text.parquet", table, metadata={"source": "text_feat.npy"})
    ran, entry = run(config(tmp_path, models, text_encoder="imported", image_encoder="none"), tmp_path / "w")
    text, meta = features(tmp_path / "w", "text")
    got, got_valid = arrow_to_vectors(text.column("vector"))
    np.testing.assert_array_equal(got[valid], vectors[valid])
    assert got_valid.tolist() == valid.tolist() and meta["encoder"] == "imported" and meta["dim"] == 5
    assert entry["counts"] == {"text_ok": 3, "text_missing": 1}


def test_imported_without_the_file_says_where_it_comes_from(tmp_path, models):
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 2), tmp_path / "cat")
    with pytest.raises(StageError, match="mmrec"):
        run(config(tmp_path, models, image_encoder="imported"), tmp_path / "w")


def test_default_image_encoder_offline_fails_before_any_work(tmp_path, models, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty
    monkeypatch.setenv("HOME", str(tmp_path))
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 2), tmp_path / "cat")
    cfg = config(tmp_path, models, image_encoder="open_clip:ViT-B-32/laion2b_s34b_b79k")
    with pytest.raises(StageError) as e:
        run(cfg, tmp_path / "w")
    msg = str(e.value)
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in msg and "not on this machine" in msg
    assert "encode.modalities.image.encoder" in msg and str(cfg.source) in msg
    assert not (tmp_path / "w" / "features").exists()


def test_bad_text_template_names_the_key(tmp_path, models):
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 2), tmp_path / "cat")
    with pytest.raises(StageError, match="encode.modalities.text.template.*brand"):
        run(config(tmp_path, models, text_template="{brand} {title}"), tmp_path / "w")


# ---- resume after kill -9, incremental reruns -----------------------------------------------
SLOW_RUN = """
import sys, time
from clearrec.pipeline.config import load_config
from clearrec.pipeline.runner import Runner
from clearrec.stages import _encode_shards, encode

flush = _encode_shards.ShardWorker._flush
def slow_flush(self, shard):  # slow the model down so the test can kill the run between shards
    time.sleep(0.3)
    flush(self, shard)
_encode_shards.ShardWorker._flush = slow_flush
Runner([encode.SPEC], load_config(sys.argv[1]), sys.argv[2]).run()
"""


@pytest.mark.slow
def test_killed_run_resumes_unfinished_shards_only_and_writes_identical_files(tmp_path, models):
    cat = tmp_path / "cat"
    rows = write_catalog(cat, 30)
    write_items(tmp_path / "killed", rows, cat)
    write_items(tmp_path / "whole", rows, cat)
    cfg = config(tmp_path, models, shard_size=5, batch_size=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(cfg.source), str(tmp_path / "killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = tmp_path / "killed" / "features" / ".cache" / "image"
    deadline = time.monotonic() + 240
    while len(list(markers.glob("*/*.done"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the slowed run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*/*.done")))
    assert 2 <= done < 6 and not (tmp_path / "killed" / "features" / "image.parquet").exists()

    _, entry = run(cfg, tmp_path / "killed")
    counts = entry["counts"]
    assert counts["image_shards_reused"] == done and counts["image_shards_run"] == 6 - done
    assert counts["image_encoded"] == 30 - 5 * done and counts["image_cached"] == 5 * done
    run(cfg, tmp_path / "whole")
    for modality in ("image", "text"):
        killed = (tmp_path / "killed" / "features" / f"{modality}.parquet").read_bytes()
        assert killed == (tmp_path / "whole" / "features" / f"{modality}.parquet").read_bytes()


def test_adding_ten_items_encodes_only_those_ten(tmp_path, models):
    cat = tmp_path / "cat"
    old = write_catalog(cat, 30)
    new = write_catalog(cat, 10, start=100)
    cfg = config(tmp_path, models, shard_size=8)
    write_items(tmp_path / "w", old, cat)
    run(cfg, tmp_path / "w")
    before = {m: features(tmp_path / "w", m)[0] for m in ("image", "text")}
    grown = old[:5] + new[:4] + old[5:20] + new[4:] + old[20:]  # new items in the middle and at the end
    write_items(tmp_path / "w", grown, cat)
    ran, entry = run(cfg, tmp_path / "w")
    assert ran == ["encode"]
    for m in ("image", "text"):
        assert entry["counts"][f"{m}_encoded"] == 10 and entry["counts"][f"{m}_ok"] == 40
        after = features(tmp_path / "w", m)[0]
        ids = after.column("item_id").to_pylist()
        assert ids == [r["item_id"] for r in grown]
        vec_after, _ = arrow_to_vectors(after.column("vector"))
        vec_before, _ = arrow_to_vectors(before[m].column("vector"))
        pos = {r["item_id"]: i for i, r in enumerate(old)}
        old_rows = [i for i, item in enumerate(ids) if item in pos]
        np.testing.assert_array_equal(vec_after[old_rows], vec_before[[pos[ids[i]] for i in old_rows]])
        # the cache keeps only what the current file was built from
        cache = tmp_path / "w" / "features" / ".cache" / m
        assert len(list(cache.glob("*/*.done"))) == len(list(cache.glob("*/*.parquet"))) <= 5 + 4


# ---- Ray backend ------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_backend_matches_local_and_reruns_without_duplicates(tmp_path, models):
    ray = pytest.importorskip("ray")
    cat = tmp_path / "cat"
    rows = write_catalog(cat, 22)
    rows[3]["image"] = "images/missing.png"
    rows[7]["title"], rows[7]["description"] = "", ""
    write_items(tmp_path / "local", rows, cat)
    write_items(tmp_path / "ray", rows, cat)
    run(config(tmp_path, models, shard_size=6), tmp_path / "local")
    cfg = config(tmp_path, models, shard_size=6, backend="ray", ray_actors=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _, entry = run(cfg, tmp_path / "ray")
        assert entry["counts"]["image_shards_run"] == 4
        for m in ("image", "text"):
            a, b = features(tmp_path / "local", m)[0], features(tmp_path / "ray", m)[0]
            for col in ("item_idx", "item_id", "status", "error", "content_sha256"):
                assert a.column(col).to_pylist() == b.column(col).to_pylist()
            (va, oka), (vb, okb) = arrow_to_vectors(a.column("vector")), arrow_to_vectors(b.column("vector"))
            assert oka.tolist() == okb.tolist()
            np.testing.assert_allclose(va, vb, atol=1e-5)
        # an unfinished shard reruns on Ray: the rows are rewritten in place, never appended
        before = (tmp_path / "ray" / "features" / "image.parquet").read_bytes()
        marker = sorted((tmp_path / "ray" / "features" / ".cache" / "image").glob("*/*.done"))[1]
        marker.unlink()
        _, entry = run(cfg, tmp_path / "ray", force=True)
        assert entry["counts"]["image_shards_run"] == 1 and entry["counts"]["text_shards_run"] == 0
        assert (tmp_path / "ray" / "features" / "image.parquet").read_bytes() == before
    finally:
        ray.shutdown()


# ---- remote images ----------------------------------------------------------------------------
class _Images(http.server.BaseHTTPRequestHandler):
    good = image_bytes(7)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/slow.png":
            time.sleep(3)
        body = {"/good.png": self.good, "/slow.png": self.good, "/corrupt.png": b"\xff\xd8\xff" + b"junk" * 50,
                "/big.png": b"\x89PNG" + b"\x00" * 5000}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout / size cap), as intended

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_images_get_a_status_each(tmp_path, models, image_server):
    import socket

    urls = {"good": "ok", "corrupt": "corrupt", "slow": "timeout", "missing": "http_error", "big": "too_large"}
    rows = [{"item_id": name, "title": name, "image": f"{image_server}/{name}.png"} for name in urls]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rows.append({"item_id": "refused", "title": "refused", "image": f"http://127.0.0.1:{closed}/x.png"})
    urls["refused"] = "fetch_error"
    write_items(tmp_path / "w", rows, tmp_path)
    cfg = config(tmp_path, models, text_encoder="none", remote_images=True, http_allow_private=True, http_timeout_s=1.0, http_max_bytes=2000)
    run(cfg, tmp_path / "w")
    image, _ = features(tmp_path / "w", "image")
    assert image.column("status").to_pylist() == list(urls.values())
    assert image.column("content_sha256")[0].as_py() == hashlib.sha256(_Images.good).hexdigest()
    assert "HTTP 404" in image.column("error")[3].as_py()
    run(config(tmp_path, models, text_encoder="none"), tmp_path / "w")
    assert set(features(tmp_path / "w", "image")[0].column("status").to_pylist()) == {"remote_disabled"}
