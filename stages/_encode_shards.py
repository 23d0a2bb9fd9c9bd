"""One shard of work: read, hash, look up, decode, batch, encode, write the shard file + marker.

Used in-process by the local backend and inside each actor by the Ray backend, so both
produce the same shard files. Items are prepared ``window`` ahead on a thread pool (reading,
hashing, decoding and preprocessing images release the GIL) while the model runs on the
calling thread; batches never cross a shard, so a shard's vectors do not depend on what ran
before it (a resumed run writes the same bytes as an uninterrupted one).
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from ..pipeline.lazy import lazy_module
from ..pipeline.store import ArtifactStore, sha256_file, vectors_to_arrow
from ._encode_sources import FetchOptions, SourceError, read_bytes

torch = lazy_module("torch")  # imported on first use (pipeline/lazy.py)
images = lazy_module("clearrec.models.images")  # Pillow, likewise

# outcomes that depend only on the content bytes and the encoder settings, so they are cached by content hash
CACHEABLE = ("ok", "corrupt", "truncated", "unsupported_format", "decompression_bomb", "preprocess_error")

Lookup = dict[bytes, tuple[str, "str | None", str]]  # sha256 digest -> (status, error, shard stem with the vector)


@dataclass(frozen=True)
class WorkerOptions:
    workdir: str  # work directory root (shard files are artifacts inside it)
    modality: str  # "image" | "text"
    batch_size: int
    num_workers: int  # image preparation threads; 0 = inline
    max_pixels: int
    http_timeout_s: float
    http_max_bytes: int
    http_max_redirects: int
    http_allow_private: bool


class Prepared(NamedTuple):
    status: str
    error: str | None
    digest: bytes | None  # sha256 of the content, None when there is none
    payload: Any  # (H, W, 3) uint8 pixels or the text, for items the model must see; else None
    vector_from: str | None  # shard stem holding this content's cached result


class _Shard:
    """The rows of one shard being filled."""

    def __init__(self, task: dict[str, Any], dim: int):
        n = len(task["item_idx"])
        self.task = task
        self.status: list[str] = [""] * n
        self.error: list[str | None] = [None] * n
        self.sha: list[str | None] = [None] * n
        self.vector_from: list[str | None] = [None] * n
        self.vectors = np.zeros((n, dim), dtype=np.float32)  # (n, d)
        self.valid = np.zeros(n, dtype=bool)
        self.pending: list[tuple[int, Any]] = []  # (row, payload) waiting for the model
        self.first: dict[bytes, int] = {}  # digest -> first row sent to the model
        self.copies: list[tuple[int, int]] = []  # (row, row whose vector it repeats)
        self.counts = {"rows": n, "encoded": 0, "cached": 0, "duplicates": 0}
        self.next_row = 0


class ShardWorker:
    """Runs shard tasks with one loaded encoder and writes one Parquet file + marker per shard."""

    def __init__(self, encoder: Any, options: WorkerOptions, lookup: Lookup,
                 progress: Callable[[int], None] | None = None):
        self.encoder = encoder
        self.opts = options
        self.lookup = lookup
        self.progress = progress
        self.store = ArtifactStore(options.workdir)
        threads = options.num_workers if options.modality == "image" else 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="encode-read") if threads else None
        self.window = max(2 * options.batch_size, 4 * threads)
        self.fetch = FetchOptions(options.http_timeout_s, options.http_max_bytes, options.http_max_redirects,
                                  options.http_allow_private)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    # ---- preparing items (worker threads) ------------------------------------------
    def prepare(self, task: dict[str, Any], i: int) -> Prepared:
        kind, source = task["kind"][i], task["source"][i]
        if not kind:
            return Prepared(task["status"][i], task["error"][i], None, None, None)
        if kind == "text":
            data = source.encode("utf-8")
        else:
            try:
                data = read_bytes(kind, source, self.fetch)
            except SourceError as e:
                return Prepared(e.code, str(e), None, None, None)
        digest = hashlib.sha256(data).digest()
        hit = self.lookup.get(digest)
        if hit is not None:
            return Prepared(hit[0], hit[1], digest, None, hit[2])
        if kind == "text":
            return Prepared("ok", None, digest, source, None)
        try:
            pixels = self.encoder.preprocess(images.safe_open_image(data, self.opts.max_pixels))  # (H, W, 3) uint8
        except images.ImageDecodeError as e:
            return Prepared(e.code, str(e), digest, None, None)
        except Exception as e:  # a transform failing on an odd image is that item's failure, not the run's
            return Prepared("preprocess_error", f"{type(e).__name__}: {e}", digest, None, None)
        return Prepared("ok", None, digest, pixels, None)

    def _prepared(self, tasks: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Prepared | None]]:
        """``(task, None)`` when a shard starts, then ``(task, Prepared)`` per item, in order."""
        pending: deque[tuple[dict[str, Any], Future | int | None]] = deque()

        def resolve(entry: tuple[dict[str, Any], Future | int | None]) -> tuple[dict[str, Any], Prepared | None]:
            task, ref = entry
            if ref is None:
                return task, None
            return task, ref.result() if isinstance(ref, Future) else self.prepare(task, ref)

        for task in tasks:
            pending.append((task, None))
            for i in range(len(task["item_idx"])):
                pending.append((task, self.pool.submit(self.prepare, task, i) if self.pool else i))
                while len(pending) > self.window:
                    yield resolve(pending.popleft())
        while pending:
            yield resolve(pending.popleft())

    # ---- running shards (calling thread) -------------------------------------------
    def run(self, tasks: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Encode each task's shard; yields the shard's counts after its file and marker exist."""
        shard: _Shard | None = None
        for task, prep in self._prepared(tasks):
            if prep is None:
                if shard is not None:
                    yield self._finish(shard)
                shard = _Shard(task, self.encoder.dim)
                continue
            self._add(shard, prep)
        if shard is not None:
            yield self._finish(shard)

    def _add(self, shard: _Shard, prep: Prepared) -> None:
        i = shard.next_row
        shard.next_row += 1
        shard.status[i], shard.error[i] = prep.status, prep.error
        shard.sha[i] = prep.digest.hex() if prep.digest is not None else None
        if prep.vector_from is not None:
            shard.vector_from[i] = prep.vector_from
            shard.counts["cached"] += 1
        elif prep.payload is not None and prep.digest is not None:
            first = shard.first.get(prep.digest)
            if first is None:
                shard.first[prep.digest] = i
                shard.pending.append((i, prep.payload))
                if self.opts.modality == "image" and len(shard.pending) >= self.opts.batch_size:
                    self._flush(shard)
                return  # counted as done when the model has seen it
            shard.copies.append((i, first))
            shard.counts["duplicates"] += 1
        self._done(1)

    def _done(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def _flush(self, shard: _Shard) -> None:
        if not shard.pending:
            return
        rows = [r for r, _ in shard.pending]
        payloads = [p for _, p in shard.pending]
        shard.pending = []
        if self.opts.modality == "image":
            vectors = self.encoder.encode_pixels(torch.stack(payloads))  # (B, d)
        else:
            vectors = self.encoder.encode(payloads)  # (B, d)
        shard.vectors[rows] = vectors
        shard.valid[rows] = True
        shard.counts["encoded"] += len(rows)
        self._done(len(rows))

    def _finish(self, shard: _Shard) -> dict[str, Any]:
        if self.opts.modality == "text":
            # longest first, so each batch pads to similar lengths; the order is fixed by the shard's content
            todo = sorted(shard.pending, key=lambda rp: (-len(rp[1]), rp[0]))
            shard.pending = []
            for lo in range(0, len(todo), self.opts.batch_size):
                shard.pending = todo[lo : lo + self.opts.batch_size]
                self._flush(shard)
        self._flush(shard)
        for row, src in shard.copies:
            shard.vectors[row] = shard.vectors[src]
            shard.valid[row] = shard.valid[src]
        task = shard.task
        table = pa.table({
            "item_idx": pa.array(task["item_idx"], pa.int64()),
            "item_id": pa.array(task["item_id"], pa.string()),
            "content_sha256": pa.array(shard.sha, pa.string()),
            "status": pa.array(shard.status, pa.string()),
            "error": pa.array(shard.error, pa.string()),
            "vector": vectors_to_arrow(shard.vectors, shard.valid),
            "vector_from": pa.array(shard.vector_from, pa.string()),
            "truncated": pa.array(task["truncated"], pa.bool_()),
        })
        path = self.store.write_parquet(task["file"], table)
        counts = {**shard.counts, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        self.store.write_json(task["marker"], counts)
        return {"name": task["name"], **counts}
