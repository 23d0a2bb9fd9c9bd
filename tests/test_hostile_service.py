"""The service under abuse and load: 422 for unechoable input, reduced and bounded image decodes, batching."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_data import PaletteEncoder, build_workdir, png

import clearrec
from clearrec.models.encoders import load_text_encoder
from clearrec.pipeline import _serving
from clearrec.pipeline.config import Config
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.service import create_app
from clearrec.stages import index as index_stage
from test_service import running

uvicorn = pytest.importorskip("uvicorn")
TEXTS = ["wooden train", "baby bottle", "swaddle", "car seat", "stroller", "teething ring", "bottle", "soft toy",
         "red wooden toy train", "glass bottle", "muslin blanket", "jogging stroller"]


class Counting:
    """Wraps an encoder and records the batch size of every forward pass."""

    def __init__(self, inner, forward: str):
        self.inner, self.forward, self.sizes = inner, forward, []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if name not in (self.forward, "encode"):
            return value

        def call(batch):
            n = len(batch) if name == "encode" or not hasattr(batch, "keys") else len(batch["input_ids"])
            with self.lock:
                self.sizes.append(n)
            return value(batch)
        return call


class SizedPalette(PaletteEncoder):
    """The palette stand-in with an input size, recording the sizes of the images it is given."""

    image_size = (32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def encode(self, images):
        self.seen.extend(im.size for im in images)
        return super().encode(images)


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
def served(workdir, text_encoder):
    rec = clearrec.open(workdir, encoders={"text": text_encoder, "image": PaletteEncoder()})
    with running(create_app(recommender=rec, max_body_bytes=1 << 20)) as url:
        yield url


# ---- 15: input JSON cannot echo back is still a 422 -------------------------------------------
@pytest.mark.parametrize("body", [b'{"text": "\\ud800", "k": 5}', b'{"text": "ok \\udfff x"}', b'{"text": "x", "k": 1e400}',
                                  b'{"text": "x", "k": -1e400}', b'{"text": "x", "k": NaN}',
                                  b'{"text": "x", "ef_search": 1e999}', b'{"image_base64": "\\ud83d", "k": 3}',
                                  b'{"text": "x", "k": 5, "extra\\ud800": 1}'])
def test_unechoable_input_is_422_not_500(served, body):
    r = httpx.post(f"{served}/search", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_a_lone_surrogate_says_what_is_wrong(served):
    r = httpx.post(f"{served}/search", content=b'{"text": "\\ud800"}', headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 422 and "text" in r.json()["detail"][0]["loc"]


# ---- 16: query images decoded reduced, a bounded number at a time, memory returned ------------
def _big(fmt: str, size: tuple[int, int], colour=(220, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_query_images_reach_the_encoder_reduced_to_its_input_size(workdir, text_encoder, fmt):
    encoder = SizedPalette()
    rec = clearrec.open(workdir, encoders={"text": text_encoder, "image": encoder})
    hits = rec.search_image(_big(fmt, (3000, 2000)), k=5)
    assert encoder.seen and min(encoder.seen[-1]) < 2 * 32 <= 2 * min(encoder.seen[-1])  # shorter side in [32, 64)
    small = rec.search_image(png(0, 48), k=5)  # under twice the input size: decoded as it is
    assert encoder.seen[-1] == (48, 48)
    assert [h.item_id for h in hits] == [h.item_id for h in small]  # same colour, same neighbours


def test_concurrent_image_decodes_are_bounded(workdir, text_encoder, monkeypatch):
    from clearrec.models import images

    real, active, peak, lock = images.safe_open_image, [0], [0], threading.Lock()

    def tracked(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(images, "safe_open_image", tracked)
    rec = clearrec.open(workdir, encoders={"text": text_encoder, "image": SizedPalette()})
    data = png(2, 40)
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda _: [h.item_id for h in rec.search_image(data, k=5)], range(24)))
    assert all(r == results[0] for r in results)
    assert 1 <= peak[0] <= _serving.MAX_DECODES


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _query_image_memory(workdir: str) -> tuple[float, float]:
    """MB above the settled RSS: (peak, after) while 8 threads search with a 5000 x 5000 PNG each."""
    rec = clearrec.open(workdir, encoders={"text": load_text_encoder("all-MiniLM-L6-v2"), "image": SizedPalette()})
    data = _big("PNG", (5000, 5000))  # ~75 MB of RGB pixels from a small file
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: rec.search_image(png(1), k=5), range(8)))  # threads and caches set up
        _serving.release_memory()
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        list(pool.map(lambda _: rec.search_image(data, k=5), range(8)))
        return (_rss_kib("VmHWM") - base) / 1024, (_rss_kib("VmRSS") - base) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="needs Linux /proc")
def test_large_query_images_do_not_hold_memory(workdir):
    # measured in a fresh interpreter: a long test session's heap would blur the peak
    code = f"import json, test_hostile_service as t; print(json.dumps(t._query_image_memory({str(workdir)!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_mb, after_mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 75 * (_serving.MAX_DECODES + 2), peak_mb  # 8 full decodes at once: ~680 MB measured here
    assert after_mb < 60, after_mb


# ---- 17: concurrent queries share forward passes, each answer as if alone ----------------------
def test_batcher_answers_each_query_as_alone_with_fewer_forward_passes(workdir, text_encoder):
    counting = Counting(text_encoder, "encode_packed")
    rec = clearrec.open(workdir, encoders={"text": counting, "image": PaletteEncoder()})
    alone = {t: [h.to_dict() for h in rec.search_text(t, k=10)] for t in TEXTS}
    single_passes = len(counting.sizes)
    assert single_passes == len(TEXTS) and set(counting.sizes) == {1}
    counting.sizes.clear()
    jobs = [t for t in TEXTS for _ in range(6)]
    start = threading.Barrier(24)

    def ask(text):
        try:
            start.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        return text, [h.to_dict() for h in rec.search_text(text, k=10)]

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(ask, jobs))
    for text, got in answers:
        assert got == alone[text], text
    assert sum(counting.sizes) == len(jobs) and len(counting.sizes) < len(jobs) and max(counting.sizes) > 1


def test_batched_vectors_are_bitwise_those_of_single_queries(text_encoder):
    worker = ThreadPoolExecutor(max_workers=1)
    batcher = _serving.QueryBatcher(worker, lambda m, p: _serving.encode_rows(text_encoder, m, p), window_s=0.05)
    alone = {t: batcher.submit("text", t) for t in TEXTS}
    assert batcher.batches == len(TEXTS)
    texts = TEXTS * 3
    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        batched = list(pool.map(lambda t: batcher.submit("text", t), texts))
    assert batcher.batches < 2 * len(TEXTS)
    for t, v in zip(texts, batched):
        assert np.array_equal(v, alone[t]), t
    worker.shutdown()


def test_a_failing_query_fails_alone(text_encoder):
    class Picky:
        def encode(self, images):
            if images[0] == "bad":
                raise ValueError("cannot encode 'bad'")
            return np.ones((len(images), 3), np.float32)

    worker = ThreadPoolExecutor(max_workers=1)
    batcher = _serving.QueryBatcher(worker, lambda m, p: _serving.encode_rows(Picky(), m, p), window_s=0.05)

    def ask(payload):
        try:
            return batcher.submit("image", payload)
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=6) as pool:
        out = list(pool.map(ask, ["ok", "bad", "ok", "ok", "bad", "ok"]))
    assert [isinstance(o, str) for o in out] == [False, True, False, False, True, False]
    worker.shutdown()


def test_http_text_searches_under_concurrency_match_the_python_api(workdir, text_encoder):
    counting = Counting(text_encoder, "encode_packed")
    rec = clearrec.open(workdir, encoders={"text": counting, "image": PaletteEncoder()})
    expected = {t: [h.to_dict() for h in rec.search_text(t, k=10)] for t in TEXTS}
    counting.sizes.clear()
    image = base64.b64encode(png(1)).decode()
    with running(create_app(recommender=rec)) as url:
        def call(i):
            with httpx.Client(base_url=url, timeout=60) as c:
                if i % 5 == 4:
                    return None, c.post("/search", json={"image_base64": image, "k": 10}).status_code
                t = TEXTS[i % len(TEXTS)]
                r = c.post("/search", json={"text": t, "k": 10})
                return t, (r.status_code, r.json()["results"])
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(call, range(100)))
    for text, got in answers:
        if text is None:
            assert got == 200
        else:
            assert got == (200, expected[text]), text
    assert len(counting.sizes) < 80  # 80 text queries


# ---- 17: the text encoder in its own process (clearrec serve), same bytes ------------------------
@pytest.fixture(scope="module")
def encoder_process():
    from clearrec.pipeline._encoder_process import TextEncoderProcess

    proc = TextEncoderProcess("all-MiniLM-L6-v2")
    yield proc
    proc.close()


def test_encoder_process_gives_the_bytes_of_the_encoder_in_process(encoder_process, text_encoder):
    assert (encoder_process.identity, encoder_process.weights_sha256, encoder_process.dim) == \
        (text_encoder.identity, text_encoder.weights_sha256, text_encoder.dim)
    here = _serving.encode_rows(text_encoder, "text", TEXTS)
    there = encoder_process.encode_rows(TEXTS)
    assert all(np.array_equal(a, b) for a, b in zip(here, there))
    assert np.array_equal(encoder_process.encode(TEXTS), text_encoder.encode(TEXTS))


def test_a_dead_encoder_process_fails_its_call_and_is_restarted(encoder_process, monkeypatch):
    from clearrec.pipeline import _encoder_process
    from clearrec.pipeline.errors import EncoderUnavailableError

    started = encoder_process.starts
    encoder_process._proc.kill()  # dies between calls: the next call starts another
    encoder_process._proc.wait()
    assert encoder_process.encode_rows(["swaddle"])[0].shape == (encoder_process.dim,)
    assert encoder_process.starts == started + 1
    with monkeypatch.context() as m:  # dies during a call (its reply never comes): that call fails, cleanly
        m.setattr(_encoder_process, "_recv", lambda stream: encoder_process._proc.kill())
        with pytest.raises(EncoderUnavailableError, match="exited"):
            encoder_process.encode_rows(["swaddle"])
    assert encoder_process.encode_rows(["swaddle"])[0].shape == (encoder_process.dim,)
    assert encoder_process.starts == started + 2


def test_an_encoder_that_cannot_load_is_a_clear_error():
    from clearrec.pipeline._encoder_process import TextEncoderProcess
    from clearrec.pipeline.errors import EncoderUnavailableError

    with pytest.raises(EncoderUnavailableError, match="no-such-model"):
        TextEncoderProcess("sentence-transformers:/no-such-model")


def test_search_answers_are_the_same_with_the_text_encoder_in_its_own_process(workdir, text_encoder):
    here = clearrec.open(workdir, encoders={"text": text_encoder, "image": PaletteEncoder()})
    there = clearrec.open(workdir, encoders={"image": PaletteEncoder()}, text_encoder_processes=2)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent: batched in the children
            got = list(pool.map(lambda t: [h.to_dict() for h in there.search_text(t, k=10)], TEXTS * 4))
        assert got == [[h.to_dict() for h in here.search_text(t, k=10)] for t in TEXTS] * 4
        children = [c._proc for c in there._queries.encoder("text").children]
        assert len(children) == 2 and all(c.poll() is None for c in children)
    finally:
        there.close()
    assert all(c.poll() is not None for c in children)  # close() ends the children


def test_an_encoder_pool_answers_while_one_child_is_busy():
    from clearrec.pipeline._encoder_process import TextEncoderPool

    pool = TextEncoderPool("all-MiniLM-L6-v2", processes=2)
    try:
        assert len({c._proc.pid for c in pool.children}) == 2 and pool.starts == 2
        busy = pool._free.get()  # one child taken, as by a batch in flight
        answered = pool.encode_rows(["swaddle", "car seat"])  # the other one answers
        pool._free.put(busy)
        assert np.array_equal(np.stack(answered), np.stack(busy.encode_rows(["swaddle", "car seat"])))
    finally:
        pool.close()
    assert all(c._proc is None for c in pool.children)


def test_text_batches_run_at_the_same_time_on_an_encoder_pool(workdir, monkeypatch):
    from clearrec.pipeline._encoder_process import TextEncoderPool

    both = threading.Barrier(2, timeout=20)  # broken unless two batches are encoding at once
    first_in = threading.Event()
    real = TextEncoderPool.encode_rows

    def meet(self, texts):
        first_in.set()
        both.wait()
        return real(self, texts)

    rec = clearrec.open(workdir, encoders={"image": PaletteEncoder()}, text_encoder_processes=2)
    try:
        expected = [h.to_dict() for h in rec.search_text("stroller", k=5)]
        monkeypatch.setattr(TextEncoderPool, "encode_rows", meet)
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(rec.search_text, "stroller", 5)
            assert first_in.wait(20)  # the first batch is in its forward pass: the second is a batch of its own
            second = pool.submit(rec.search_text, "stroller", 5)
            assert [h.to_dict() for h in first.result()] == [h.to_dict() for h in second.result()] == expected
    finally:
        rec.close()


# ---- 17: texts of different lengths share one forward pass, each row as if alone ---------------
WORDS = ("soft wooden baby bottle swaddle car seat stroller teething ring blanket bib organic cotton "
         "night light musical mobile crib sheet diaper bag bath thermometer rattle").split()


def test_texts_of_every_length_go_through_one_forward_pass(text_encoder):
    assert text_encoder.packs
    counting = Counting(text_encoder, "encode_packed")
    lengths = {int(text_encoder.tokenize([t])["input_ids"].shape[1]) for t in TEXTS}
    assert len(lengths) > 1  # the queries need more than one padded length ...
    rows = _serving.encode_rows(counting, "text", TEXTS)
    assert counting.sizes == [len(TEXTS)]  # ... and still take one pass
    assert np.allclose(np.stack(rows), text_encoder.encode(TEXTS), atol=1e-6)


def test_packed_rows_are_bitwise_the_text_alone_over_many_lengths_and_batches(text_encoder):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) for _ in range(60)]
    alone = {t: _serving.encode_rows(text_encoder, "text", [t])[0] for t in texts}
    seen = {int(text_encoder.tokenize([t])["input_ids"].shape[1]) for t in texts}
    assert len(seen) > 10
    for size in (2, 3, 7, 16, 60):
        batch = list(rng.choice(texts, size=size))
        for t, row in zip(batch, _serving.encode_rows(text_encoder, "text", batch)):
            assert np.array_equal(row, alone[t]), (size, t)


def test_an_encoder_that_does_not_pack_takes_one_pass_per_padded_length(text_encoder):
    class Unpacked(Counting):
        packs = False

    counting = Unpacked(text_encoder, "encode_tokens")
    padded = {-(-int(text_encoder.tokenize([t])["input_ids"].shape[1]) // _serving.TEXT_PAD) for t in TEXTS}
    rows = _serving.encode_rows(counting, "text", TEXTS)
    assert len(counting.sizes) == len(padded) > 1 and sum(counting.sizes) == len(TEXTS)
    for t, row in zip(TEXTS, rows):
        assert np.array_equal(row, _serving.encode_rows(counting, "text", [t])[0]), t


@pytest.mark.parametrize("normalize", [True, False])
def test_packed_forward_equals_the_sentence_transformers_model(text_encoder, normalize):
    enc = text_encoder if normalize else load_text_encoder("all-MiniLM-L6-v2", normalize=False)
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(20)] + ["x"]
    padded = [_serving._pad_tokens(enc.tokenize([t]), 0) for t in texts]
    assert np.allclose(enc.encode_packed(padded), enc.encode(texts), atol=1e-6)


# ---- 17: what a serving process has loaded stays out of its later full collections --------------
def test_the_encoder_process_freezes_its_loaded_heap(encoder_process):
    assert encoder_process.frozen_objects > 10_000  # torch + transformers + the model


def test_serve_warm_up_freezes_the_server_heap():
    import gc

    from clearrec.pipeline.cli.serve import warm_up_in_background

    class Rec:
        warmed = False

        def warm_up(self):
            Rec.warmed = True

    gc.unfreeze()
    try:
        warm_up_in_background(Rec()).join(timeout=60)
        assert Rec.warmed and gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
