"""The HTTP service under a real uvicorn on 127.0.0.1: endpoints, errors, limits, concurrency."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from serving_data import PaletteEncoder, build_workdir, png

import clearrec
from clearrec.models import ann
from clearrec.models.encoders import load_text_encoder
from clearrec.pipeline.config import Config
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.service import FastPath, create_app
from clearrec.stages import index as index_stage

uvicorn = pytest.importorskip("uvicorn")
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, text_encoder):
    root = tmp_path_factory.mktemp("workdir")
    build_workdir(root, text_encoder)
    Runner([index_stage.SPEC], Config(), root).run()
    return root


@pytest.fixture(scope="module")
def rec(workdir, text_encoder):
    return clearrec.open(workdir, encoders={"text": text_encoder, "image": PaletteEncoder()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """A real uvicorn server for ``app`` in a thread on a free port of 127.0.0.1, shut down after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def base_url(rec):
    with running(create_app(recommender=rec, max_body_bytes=MAX_BODY)) as url:
        yield url


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def dicts(hits):
    return [h.to_dict() for h in hits]


def test_health(client, rec):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["items"] == rec.num_items and body["users"] == 60
    assert body["items_index"]["factory"] == "Flat" and body["content_index"]["rows"] == rec.content.index.ntotal


def test_endpoints_answer_like_the_python_api(client, rec):
    r = client.get("/recommend/user03", params={"k": 5})
    assert r.status_code == 200 and r.json()["results"] == dicts(rec.recommend("user03", 5))
    r = client.get("/recommend/user03", params={"k": 5, "exclude_seen": "false"})
    assert r.json()["results"] == dicts(rec.recommend("user03", 5, exclude_seen=False))
    assert client.get("/similar/item042").json()["results"] == dicts(rec.similar("item042", 20))
    r = client.get("/similar/item042", params={"k": 3, "source": "cf"})
    assert r.json()["results"] == dicts(rec.similar("item042", 3, source="cf"))
    r = client.post("/search", json={"text": "jogging stroller", "k": 4})
    assert r.status_code == 200 and r.json()["results"] == dicts(rec.search_text("jogging stroller", 4))
    r = client.post("/search", json={"image_base64": base64.b64encode(png(5)).decode(), "k": 6})
    assert r.status_code == 200 and r.json()["results"] == dicts(rec.search_image(png(5), 6))


def test_plain_and_unusual_query_strings_get_the_same_answers(client, rec):
    """Plain requests are answered by the fast path, the others by FastAPI: same results."""
    want = dicts(rec.recommend("user05", 7))
    for query in ("k=7", "k=007", "k=7&exclude_seen=true", "k=7&exclude_seen=True", "k=7&exclude_seen=yes",
                  "k=7&unknown=1", "k=3&k=7"):
        r = client.get(f"/recommend/user05?{query}")
        assert r.status_code == 200 and r.json()["results"] == want, query
    want = dicts(rec.recommend("user05", 7, exclude_seen=False))
    for flag in ("false", "0", "False", "off"):
        assert client.get(f"/recommend/user05?k=7&exclude_seen={flag}").json()["results"] == want, flag
    for query in ("k=7&source=cf", "source=cf&k=7&extra="):
        assert client.get(f"/similar/item009?{query}").json()["results"] == dicts(rec.similar("item009", 7, "cf"))
    assert client.get("/recommend/user05?k=%D9%A1").status_code == 422  # a non-ASCII digit is not a number
    assert client.get("/recommend/user05/").status_code == 307  # FastAPI's own trailing-slash redirect


def test_fast_path_takes_only_plain_well_formed_requests(rec):
    fast = FastPath(app=None, state={"rec": rec})

    def parsed(path: str, query: str = "") -> bool:
        return fast._parse({"type": "http", "method": "GET", "path": path, "query_string": query.encode()}) is not None

    assert parsed("/recommend/user01") and parsed("/recommend/user01", "k=5&exclude_seen=false")
    assert parsed("/similar/item001", "k=1000&source=cf") and parsed("/recommend/any-id", "ef_search=32")
    for path, query in [("/recommend/user01", "k=0"), ("/recommend/user01", "k=1001"), ("/recommend/user01", "k=x"),
                        ("/recommend/user01", "exclude_seen=True"), ("/recommend/user01", "k=1&k=2"),
                        ("/recommend/user01", "source=cf"), ("/similar/item001", "source=other"),
                        ("/similar/item001", "exclude_seen=true"), ("/recommend/a/b", ""), ("/recommend/", ""),
                        ("/health", ""), ("/search", "")]:
        assert not parsed(path, query), (path, query)


def test_unknown_ids_are_404_with_a_message(client):
    r = client.get("/recommend/nobody")
    assert r.status_code == 404 and "unknown user 'nobody'" in r.json()["detail"]
    r = client.get("/similar/nothing")
    assert r.status_code == 404 and "unknown item 'nothing'" in r.json()["detail"]


@pytest.mark.parametrize("k", [0, -1, 1001, "x"])
def test_k_outside_1_to_1000_is_422(client, k):
    assert client.get("/recommend/user00", params={"k": k}).status_code == 422
    assert client.get("/similar/item000", params={"k": k}).status_code == 422
    assert client.post("/search", json={"text": "toy", "k": k}).status_code == 422


def test_k_bounds_themselves_are_accepted(client, rec):
    assert len(client.get("/recommend/user00", params={"k": 1}).json()["results"]) == 1
    r = client.get("/recommend/user00", params={"k": 1000})
    assert r.status_code == 200 and r.json()["results"] == dicts(rec.recommend("user00", 1000))


def test_bad_requests_are_422(client):
    assert client.post("/search", json={"k": 3}).status_code == 422  # neither text nor image
    assert client.post("/search", json={"text": "a", "image_base64": "AAAA"}).status_code == 422
    assert client.post("/search", json={"text": "a", "extra": 1}).status_code == 422
    r = client.post("/search", json={"image_base64": "***"})
    assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = client.post("/search", json={"image_base64": base64.b64encode(b"GIF89a broken").decode()})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = client.get("/recommend/user00", params={"ef_search": 32})  # an exact index has no efSearch
    assert r.status_code == 422 and "efSearch" in r.json()["detail"]
    assert client.get("/similar/item000", params={"source": "elsewhere"}).status_code == 422


def test_request_bodies_over_the_cap_are_413(client):
    big = {"text": "a" * (MAX_BODY + 10)}
    assert client.post("/search", json=big).status_code == 413

    def chunks():  # no Content-Length: the cap is enforced on the bytes received
        yield b'{"text": "'
        for _ in range(MAX_BODY // 1000 + 2):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/search", json={"text": "a" * 1000, "k": 2}).status_code == 200


@pytest.mark.slow
def test_a_burst_of_concurrent_requests_matches_the_python_api(base_url, rec):
    users = [f"user{u:02d}" for u in range(60)]
    items = [f"item{i:03d}" for i in range(0, 180, 3)]
    texts = ["wooden train", "bottle", "swaddle", "car seat", "stroller", "teething"]
    expected = {("u", u): dicts(rec.recommend(u, 10)) for u in users}
    expected.update({("i", i): dicts(rec.similar(i, 10)) for i in items})
    expected.update({("t", t): dicts(rec.search_text(t, 10)) for t in texts})
    jobs = [key for key in expected for _ in range(2)]

    def call(key):
        kind, value = key
        with httpx.Client(base_url=base_url, timeout=60) as c:
            if kind == "u":
                r = c.get(f"/recommend/{value}", params={"k": 10})
            elif kind == "i":
                r = c.get(f"/similar/{value}", params={"k": 10})
            else:
                r = c.post("/search", json={"text": value, "k": 10})
        return key, r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(call, jobs))
    assert len(answers) == len(jobs) == 252
    for key, status, body in answers:
        assert status == 200 and body["results"] == expected[key], key


def test_create_app_needs_exactly_one_source(rec):
    with pytest.raises(ValueError):
        create_app()
    with pytest.raises(ValueError):
        create_app(workdir="x", recommender=rec)


@pytest.mark.slow
def test_per_request_search_parameters_leave_the_shared_index_alone(workdir, text_encoder, tmp_path):
    root = tmp_path / "hnsw"
    shutil.copytree(workdir, root)
    Runner([index_stage.SPEC], Config().with_overrides({"index.factory": "HNSW16"}), root).run(force=True)
    hnsw = clearrec.open(root, encoders={"text": text_encoder, "image": PaletteEncoder()})
    default = hnsw.info["items"]["knob_value"]
    users = [f"user{u:02d}" for u in range(0, 60, 4)]
    expected = {(u, ef): dicts(hnsw.recommend(u, 20, ef_search=ef)) for u in users for ef in (1, 200)}
    assert any(expected[(u, 1)] != expected[(u, 200)] for u in users)  # the knob matters here

    def call(key):
        user, ef = key
        with httpx.Client(base_url=url, timeout=60) as c:
            return key, c.get(f"/recommend/{user}", params={"k": 20, "ef_search": ef}).json()["results"]

    with running(create_app(recommender=hnsw)) as url:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(call, [key for key in expected for _ in range(3)]))
        r = httpx.get(f"{url}/recommend/user00", params={"nprobe": 4})
        assert r.status_code == 422 and "nprobe applies to IVF" in r.json()["detail"]
    assert all(results == expected[key] for key, results in answers)
    assert ann.default_knob(hnsw.items.index) == ("efSearch", default)


@pytest.mark.slow
def test_clearrec_serve_command(workdir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "clearrec", "serve", "--workdir", str(workdir), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "clearrec serve did not answer /health"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/recommend/user01").status_code == 200
        # the query encoders load in the background after the server binds: an early search waits for them
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"image_base64": base64.b64encode(png(1)).decode()},
                       timeout=120)
        assert r.status_code == 503 and "test:palette-16" in r.json()["detail"]  # no such encoder to load here
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    (broken / "index" / "items.faiss").write_bytes(b"tampered")
    res = subprocess.run([*cmd[:5], str(broken), "--port", str(free_port())], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "checksum" in res.stderr and "Traceback" not in res.stderr
