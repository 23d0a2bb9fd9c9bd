"""One bad item never fails the encode stage, and nothing hangs: odd paths, special files, hostile servers."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import pytest
import tomli_w
from encode_fixtures import image_bytes, tiny_clip_dir, write_catalog, write_items
from rich.console import Console

from clearrec.models.images import ImageDecodeError, safe_open_image
from clearrec.pipeline.config import load_config
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore
from clearrec.stages import encode

QUIET = Console(stderr=True, quiet=True)
GOOD = image_bytes(3)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return f"local-dir:{tiny_clip_dir(tmp_path_factory.mktemp('models') / 'clip')}"


def encode_in_thread(tmp_path: Path, clip: str, limit_s: float = 120, **keys) -> list[str]:
    """Run the encode stage (images only) in a thread; the statuses, or a failure if it did not end."""
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"encode": {"modalities": {"image": {"encoder": clip}}, "threads": 1,
                                              "num_workers": 2, "batch_size": 4, **keys}}))
    runner = Runner([encode.SPEC], load_config(path), tmp_path / "w", console=QUIET)
    outcome: list[BaseException | None] = []

    def target():
        try:
            runner.run()
            outcome.append(None)
        except BaseException as e:  # the test reports it
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"encode did not finish within {limit_s}s"
    assert outcome == [None], f"encode failed: {outcome[0]!r}"
    table = ArtifactStore(tmp_path / "w").read_parquet("features/image.parquet")
    return table.column("status").to_pylist()


# ---- 4. a NUL byte or a symlink loop is an item status ------------------------------------------
def test_nul_byte_and_symlink_loop_are_item_statuses(tmp_path, clip):
    cat = tmp_path / "cat"
    rows = write_catalog(cat, 2)
    (cat / "images" / "loop_a").symlink_to(cat / "images" / "loop_b")
    (cat / "images" / "loop_b").symlink_to(cat / "images" / "loop_a")
    rows += [{"item_id": "nul", "title": "nul", "image": "images/p0000.png\x00.jpg"},
             {"item_id": "loop", "title": "loop", "image": "images/loop_a"}]
    write_items(tmp_path / "w", rows, cat)
    assert encode_in_thread(tmp_path, clip) == ["ok", "ok", "bad_path", "unreadable"]


# ---- 5. a FIFO (or any non-regular file) is never opened for reading ----------------------------
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "cat" / "images" / "pipe.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    yield path
    try:  # release a reader that blocked on it (the code before the fix), so the test run can end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_at_an_image_path_is_unreadable_not_a_hang(tmp_path, clip, fifo):
    rows = write_catalog(tmp_path / "cat", 1) + [{"item_id": "fifo", "title": "fifo", "image": "images/pipe.png"}]
    write_items(tmp_path / "w", rows, tmp_path / "cat")
    assert encode_in_thread(tmp_path, clip, limit_s=60) == ["ok", "unreadable"]


def test_safe_open_image_refuses_a_fifo(fifo):
    result: list[BaseException] = []
    thread = threading.Thread(target=lambda: result.append(_error(fifo)), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "safe_open_image blocked on a FIFO"
    assert isinstance(result[0], ImageDecodeError) and result[0].code == "unreadable"
    assert "not a regular file (a FIFO)" in str(result[0])


def _error(path: Path) -> BaseException | None:
    try:
        safe_open_image(path)
    except BaseException as e:  # returned to the test
        return e
    return None


# ---- 6. remote images: a wall-clock deadline, checked redirects, no private addresses -------------
class _Hostile(http.server.BaseHTTPRequestHandler):
    sent: dict[str, int] = {}  # path -> bytes the server got out before the client hung up

    def do_GET(self):  # noqa: N802 - http.server's naming
        port = self.server.server_address[1]
        try:
            if self.path == "/good.png":
                self._reply(200, GOOD)
            elif self.path == "/drip-body.png":
                self.send_response(200)
                self.send_header("Content-Length", "400")
                self.end_headers()
                self._drip("/drip-body.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 392)
            elif self.path == "/drip-headers.png":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                self._drip("/drip-headers.png", b"X-Slow: " + b"a" * 392 + b"\r\n")
            elif self.path == "/to-ftp.png":
                self._redirect(f"ftp://127.0.0.1:{port}/good.png")
            elif self.path == "/to-good.png":
                self._redirect("/good.png")
            elif self.path.startswith("/loop"):
                self._redirect(f"/loop{int(self.path[5:].split('.')[0] or 0) + 1}.png")
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as intended

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self, key: str, data: bytes) -> None:
        self.sent[key] = 0
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            self.sent[key] = i + 1
            time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _remote(tmp_path: Path, server: str, names: list[str]) -> None:
    rows = [{"item_id": n, "title": n, "image": f"{server}/{n}.png"} for n in names]
    write_items(tmp_path / "w", rows, tmp_path)


def test_a_dripping_server_is_cut_off_at_the_deadline(tmp_path, clip, server):
    _remote(tmp_path, server, ["drip-body", "drip-headers", "good"])
    statuses = encode_in_thread(tmp_path, clip, remote_images=True, http_allow_private=True, http_timeout_s=1.0)
    assert statuses == ["timeout", "timeout", "ok"]
    time.sleep(0.5)  # let the server notice the closed connections
    # 0.05 s per byte: a 1 s deadline ends each drip after ~20 bytes, long before its 400
    assert _Hostile.sent["/drip-body.png"] < 200 and _Hostile.sent["/drip-headers.png"] < 200


def test_a_host_name_that_never_resolves_times_out(tmp_path, clip, server, monkeypatch):
    import socket

    resolve = socket.getaddrinfo

    def slow(host, *args, **kwargs):
        if host == "slow.invalid":
            time.sleep(30)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    rows = [{"item_id": "dns", "title": "dns", "image": "http://slow.invalid/x.png"},
            {"item_id": "good", "title": "good", "image": f"{server}/good.png"}]
    write_items(tmp_path / "w", rows, tmp_path)
    statuses = encode_in_thread(tmp_path, clip, limit_s=20, remote_images=True, http_allow_private=True,
                                http_timeout_s=1.0)
    assert statuses == ["timeout", "ok"]


def test_redirects_are_followed_only_to_http_and_only_so_far(tmp_path, clip, server):
    _remote(tmp_path, server, ["to-good", "to-ftp", "loop"])
    statuses = encode_in_thread(tmp_path, clip, remote_images=True, http_allow_private=True, http_max_redirects=3)
    assert statuses == ["ok", "redirect_refused", "redirect_refused"]


def test_loopback_and_private_addresses_are_refused_unless_allowed(tmp_path, clip, server):
    _remote(tmp_path, server, ["good", "to-good"])
    assert encode_in_thread(tmp_path, clip, remote_images=True) == ["blocked_address", "blocked_address"]
    error = ArtifactStore(tmp_path / "w").read_parquet("features/image.parquet").column("error")[0].as_py()
    assert "127.0.0.1" in error and "encode.http_allow_private" in error
