"""A text query encoder in a child process, so that its forward passes run outside the server's GIL.

In ``clearrec serve`` the event loop answers /recommend and /similar in Python while the query
encoder runs its forward passes; in one process every torch operation of the forward pass
waits for the GIL between kernels, and the server measured at about one core of two. Here the
child process loads the encoder by its identity and runs :func:`~._serving.encode_rows` (the
same code, on the same number of torch threads), so each vector is the bytes the server
process would have computed.

Protocol, over the child's stdin / stdout (no pickle): frames of a 4-byte big-endian length
and a body. Parent -> child: JSON ``{"op": "rows" | "encode", "texts": [...]}``. Child ->
parent: a JSON header line, then ``rows x dim`` float32 values; a row that failed is zeros and
its message is in the header's ``errors``. The first frame from the child says whether the
encoder loaded (``ready``), with its identity and weights checksum.

:class:`TextEncoderPool` runs several such children of one encoder, so that forward passes of
different query batches run at the same time on different cores.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading
from typing import IO, Any, Sequence

import numpy as np

from .errors import EncoderUnavailableError

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a frame longer than this is a broken stream, not a message


def _send(stream: IO[bytes], body: bytes) -> None:
    stream.write(_LENGTH.pack(len(body)) + body)
    stream.flush()


def _recv(stream: IO[bytes]) -> bytes | None:
    """The next frame's body; None at end of stream."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise EncoderUnavailableError(f"text encoder process sent a frame of {length:,} bytes; the stream is broken")
    body = stream.read(length)
    return body if len(body) == length else None


def _pack(header: dict[str, Any], vectors: np.ndarray | None = None) -> bytes:
    data = b"" if vectors is None else np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
    return json.dumps(header).encode() + b"\n" + data


def _unpack(body: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, data = body.partition(b"\n")
    return json.loads(head), data


class TextEncoderProcess:
    """The text encoder ``identity`` loaded and run in a child process.

    Has the attributes the server checks an encoder by (``identity``, ``weights_sha256``,
    ``dim``, ``untrained``) and :meth:`encode_rows` / :meth:`encode`. Calls are serialised (one
    request in flight). A child found dead when a call begins is started again; one that dies
    during a call makes that call raise :class:`EncoderUnavailableError`.
    """

    def __init__(self, identity: str, device: str = "cpu", normalize: bool = True, torch_threads: int = 1,
                 start: bool = True):
        self._spec = {"identity": identity, "device": device, "normalize": normalize, "torch_threads": torch_threads}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.starts = 0  # child processes started so far (for health checks and tests)
        if start:
            self._start()

    def _start(self) -> None:
        self._launch()
        self._await_ready()

    def _launch(self) -> None:
        """Start the child; it loads the encoder while the caller goes on (:meth:`_await_ready` waits)."""
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(self._spec)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.starts += 1

    def _await_ready(self) -> None:
        body = _recv(self._proc.stdout)
        if body is None:
            code = self._proc.wait()
            raise EncoderUnavailableError(f"text encoder process for {self._spec['identity']!r} exited with code "
                                          f"{code} while loading (its error is on the server's stderr)")
        info, _ = _unpack(body)
        if not info.get("ready"):
            self._proc.wait()
            raise EncoderUnavailableError(info.get("error") or "text encoder process failed to load")
        self.identity, self.weights_sha256 = info["identity"], info["weights_sha256"]
        self.dim, self.untrained = int(info["dim"]), bool(info["untrained"])
        self.frozen_objects = int(info.get("frozen_objects", 0))  # objects the child keeps out of its collections

    def _call(self, op: str, texts: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                _send(self._proc.stdin, json.dumps({"op": op, "texts": list(texts)}).encode())
                body = _recv(self._proc.stdout)
            except (BrokenPipeError, OSError):
                body = None
            if body is None:
                code = self._proc.wait()
                self._proc = None
                raise EncoderUnavailableError(f"text encoder process exited with code {code}; it is restarted on "
                                              "the next query")
        header, data = _unpack(body)
        if "error" in header:
            raise ValueError(header["error"])
        vectors = np.frombuffer(data, dtype=np.float32).reshape(header["rows"], header["dim"])
        return vectors, {int(i): msg for i, msg in header["errors"].items()}

    def encode_rows(self, texts: Sequence[str]) -> list[Any]:
        """:func:`~._serving.encode_rows` of ``texts`` in the child: a (d,) vector or a ValueError per text."""
        vectors, errors = self._call("rows", texts)
        return [ValueError(errors[i]) if i in errors else vectors[i] for i in range(len(texts))]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(B,) strings -> (B, d) float32, as the encoder's own ``encode`` gives them."""
        vectors, _ = self._call("encode", texts)
        return vectors.copy()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()  # the child ends at end of input
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None


class TextEncoderPool:
    """``processes`` children (:class:`TextEncoderProcess`) of the text encoder ``identity``.

    A call takes a child that is free (waiting for one if all are busy), so up to ``processes``
    forward passes run at once, each in its own process on ``torch_threads`` thread(s): every
    child runs the same code on the same weights, so a vector is the same bytes whichever child
    computed it. The children load at the same time; if one cannot, the others are stopped and
    the error is raised. Has the attributes the server checks an encoder by.
    """

    def __init__(self, identity: str, processes: int = 2, device: str = "cpu", normalize: bool = True,
                 torch_threads: int = 1):
        if processes < 1:
            raise ValueError(f"a text encoder pool needs at least one process; got {processes}")
        self.children = [TextEncoderProcess(identity, device, normalize, torch_threads, start=False)
                         for _ in range(processes)]
        try:
            for child in self.children:
                child._launch()
            for child in self.children:
                child._await_ready()
        except BaseException:
            self.close()
            raise
        first = self.children[0]
        self.identity, self.weights_sha256, self.dim, self.untrained = (first.identity, first.weights_sha256,
                                                                        first.dim, first.untrained)
        self._free: queue.SimpleQueue[TextEncoderProcess] = queue.SimpleQueue()
        for child in self.children:
            self._free.put(child)

    @property
    def starts(self) -> int:
        """Child processes started so far, over all children (restarts included)."""
        return sum(child.starts for child in self.children)

    def _on_free_child(self, fn: Any) -> Any:
        child = self._free.get()
        try:
            return fn(child)
        finally:
            self._free.put(child)

    def encode_rows(self, texts: Sequence[str]) -> list[Any]:
        """:meth:`TextEncoderProcess.encode_rows` on a free child."""
        return self._on_free_child(lambda child: child.encode_rows(texts))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`TextEncoderProcess.encode` on a free child."""
        return self._on_free_child(lambda child: child.encode(texts))

    def close(self) -> None:
        for child in self.children:
            child.close()


def _serve(spec: dict[str, Any], requests: IO[bytes], replies: IO[bytes]) -> None:
    import torch

    from ..models.encoders import load_text_encoder
    from ._serving import encode_rows, freeze_heap

    torch.set_num_threads(spec["torch_threads"])
    try:
        enc = load_text_encoder(spec["identity"], device=spec["device"], normalize=spec["normalize"])
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(replies, _pack({"ready": False, "error": f"{type(e).__name__}: {e}"}))
        return
    frozen = freeze_heap()  # the model's objects stay out of every later full collection
    _send(replies, _pack({"ready": True, "identity": enc.identity, "weights_sha256": getattr(enc, "weights_sha256", None),
                          "dim": int(enc.dim), "untrained": bool(getattr(enc, "untrained", False)),
                          "frozen_objects": frozen}))
    while (body := _recv(requests)) is not None:
        request = json.loads(body)
        texts = [str(t) for t in request["texts"]]
        try:
            if request["op"] == "encode":
                rows: list[Any] = list(np.asarray(enc.encode(texts), dtype=np.float32))
            else:
                rows = encode_rows(enc, "text", texts, threads=spec["torch_threads"])
        except Exception as e:  # noqa: BLE001 - the whole request failed: said to the parent
            _send(replies, _pack({"error": f"{type(e).__name__}: {e}"}))
            continue
        vectors = np.zeros((len(rows), int(enc.dim)), dtype=np.float32)
        errors = {}
        for i, row in enumerate(rows):
            if isinstance(row, BaseException):
                errors[i] = str(row)
            else:
                vectors[i] = row
        _send(replies, _pack({"rows": len(rows), "dim": int(enc.dim), "errors": errors}, vectors))


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the protocol gets its own descriptor ...
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # ... and anything printed goes to stderr
    _serve(json.loads(sys.argv[1]), sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
