"""The work-directory side of encoding: shard plan, completion markers, content cache, final file.

::

    features/.cache/<modality>/<encoder key>/
        <stem>.parquet  one shard: item_idx, item_id, content_sha256, status, error, vector, vector_from, truncated
        <stem>.done     completion marker (JSON counts incl. the Parquet's size and SHA-256), written after it

``<encoder key>`` hashes the encoder identity, its weights, preprocessing, normalisation, the
source of ``models/encoders.py`` + ``models/images.py`` and the versions of torch, open_clip,
sentence-transformers, Pillow..., so results are never shared across anything that changes
them. A shard covers ``shard_size`` consecutive items; ``<stem>`` = first item_idx + the hash
of its items (item_idx, item_id and a content key: the text's hash, a file's path + size +
mtime, or the URL), so an unchanged shard of an earlier or killed run is reused as is. A
shard that does run looks every item's content hash up in the shards outside the current
plan (``vector_from`` then names the shard holding the vector), so items already encoded
under another position are not encoded again. A shard is trusted only when its file has the
size and SHA-256 its marker records; one that does not (a flipped byte) is redone, counted in
``shards_bad``, and never used as a source of cached vectors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline.errors import ArtifactError
from ..pipeline.store import META_KEY, ArtifactStore, arrow_to_vectors, sha256_file, vectors_to_arrow
from ._encode_shards import CACHEABLE, Lookup
from ._encode_sources import Rows, item_key

CACHE_ROOT = "features/.cache"
ROW_GROUP_BYTES = 16 << 20  # vector bytes per row group of the final file


LIBRARIES = ("torch", "torchvision", "open_clip_torch", "sentence-transformers", "transformers", "tokenizers", "pillow")


def encoder_key(modality: str, encoder: Any) -> str:
    """What a cached vector depends on besides the content: encoder, weights, preprocessing, code, libraries."""
    from ..models import encoders, images

    parts = {"modality": modality, "identity": encoder.identity, "weights": encoder.weights_sha256,
             "preprocess": encoder.preprocess_desc, "normalize": encoder.normalize, "dim": encoder.dim,
             "code": hashlib.sha256((inspect.getsource(encoders) + inspect.getsource(images)).encode()).hexdigest(),
             "libraries": {name: _version(name) for name in LIBRARIES}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Shard:
    stem: str
    lo: int  # first item_idx
    rows: int


def iter_rows(items: pq.ParquetFile, columns: list[str], shard_size: int,
              make_rows: Callable[[pa.RecordBatch], Rows]) -> Iterator[tuple[int, Rows]]:
    """``(first item_idx, rows)`` per shard, streaming ``items.parquet`` in item_idx order."""
    expected = 0
    for batch in items.iter_batches(batch_size=shard_size, columns=columns):
        idx = batch.column("item_idx").to_numpy()
        if not np.array_equal(idx, np.arange(expected, expected + len(idx))):
            raise ArtifactError(
                "items.parquet must hold item_idx 0..N-1 in order; rerun 'clearrec run --force --only ingest'"
            )
        yield expected, make_rows(batch)
        expected += len(idx)


def shard_stem(lo: int, rows: Rows) -> str:
    h = hashlib.sha256()
    for i in range(len(rows["item_idx"])):
        key = item_key(rows["kind"][i], rows["source"][i], rows["status"][i])
        h.update(f"{rows['item_idx'][i]}\x1f{rows['item_id'][i]}\x1f{key}\x1e".encode())
    return f"{lo:010d}-{h.hexdigest()[:24]}"


class ShardCache:
    """One modality + encoder's folder of shard files."""

    def __init__(self, store: ArtifactStore, modality: str, key: str):
        self.store = store
        self.dir = f"{CACHE_ROOT}/{modality}/{key}"
        self.path = store.path(self.dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, bool] = {}
        self.bad: set[str] = set()  # stems whose marker exists but whose file fails its size / checksum
        for tmp in self.path.glob(".*.tmp"):  # left by a killed run (the runner's lock excludes a live one)
            tmp.unlink()

    def file(self, stem: str) -> str:
        return f"{self.dir}/{stem}.parquet"

    def marker(self, stem: str) -> str:
        return f"{self.dir}/{stem}.done"

    def complete(self, stem: str) -> bool:
        """The marker exists and the shard file has the size and SHA-256 it records (checked once)."""
        if stem not in self._verified:
            self._verified[stem] = self._check(stem)
        return self._verified[stem]

    def _check(self, stem: str) -> bool:
        marker, data = self.store.path(self.marker(stem)), self.store.path(self.file(stem))
        try:
            record = json.loads(marker.read_text())
            size, digest = record["bytes"], record["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return False  # no marker (an unfinished shard), or one without a checksum
        try:
            good = data.stat().st_size == size and sha256_file(data) == digest
        except OSError:
            good = False
        if not good:
            self.bad.add(stem)
        return good

    def stems(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.done") if self.complete(p.stem))

    def reusable(self, plan: list[Shard]) -> set[str]:
        """Plan shards already done whose cached references all still exist."""
        done = set(self.stems())
        ok = set()
        for shard in plan:
            if shard.stem in done:
                refs = pq.read_table(self.store.path(self.file(shard.stem)), columns=["vector_from"]).column(0)
                if all(r in done for r in set(refs.drop_null().to_pylist())):
                    ok.add(shard.stem)
        return ok

    def lookup(self, plan: list[Shard]) -> Lookup:
        """content sha256 -> (status, error, stem) over finished shards outside ``plan``."""
        in_plan = {s.stem for s in plan}
        out: Lookup = {}
        for stem in self.stems():
            if stem in in_plan:
                continue
            t = pq.read_table(self.store.path(self.file(stem)),
                              columns=["content_sha256", "status", "error", "vector_from"])
            for sha, status, error, ref in zip(*(t.column(c).to_pylist() for c in t.column_names)):
                if sha is not None and ref is None and status in CACHEABLE:
                    out.setdefault(bytes.fromhex(sha), (status, error, stem))
        return out

    def counts(self, stem: str) -> dict[str, Any]:
        return json.loads(self.store.path(self.marker(stem)).read_text())

    def prune(self, keep: set[str]) -> int:
        """Delete shard files and markers whose stem is not in ``keep``; returns how many shards went."""
        gone = set()
        for p in self.path.iterdir():
            if p.suffix in (".parquet", ".done") and p.stem not in keep:
                p.unlink()
                gone.add(p.stem)
        return len(gone)


def assemble(store: ArtifactStore, name: str, cache: ShardCache, plan: list[Shard], dim: int,
             metadata: dict[str, Any]) -> tuple[dict[str, int], set[str]]:
    """Stream the plan's shards into ``name`` (one row per item); returns (status counts, stems used)."""
    schema = pa.schema([("item_idx", pa.int64()), ("item_id", pa.string()),
                        ("vector", pa.list_(pa.float32(), dim)), ("status", pa.string()), ("error", pa.string()),
                        ("content_sha256", pa.string()), ("truncated", pa.bool_())],
                       metadata={META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    group_rows = min(max(1024, ROW_GROUP_BYTES // (4 * dim)), 65536)
    counts: dict[str, int] = {}
    used = {s.stem for s in plan}
    sources: dict[str, tuple[dict[str, int], np.ndarray]] = {}  # stem -> (sha -> row, vectors)
    buffered: list[pa.Table] = []
    with store.atomic(name) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for shard in plan:
            t = pq.read_table(store.path(cache.file(shard.stem)))
            vectors, valid = arrow_to_vectors(t.column("vector"))  # (n, d), (n,)
            status, shas, refs = (t.column(c).to_pylist() for c in ("status", "content_sha256", "vector_from"))
            for i, (sha, ref) in enumerate(zip(shas, refs)):
                if ref is None:
                    continue
                used.add(ref)  # a cached failure also points at its shard, which the next run checks
                if status[i] == "ok":
                    if ref not in sources:
                        if len(sources) >= 8:  # keep a few source shards open
                            sources.pop(next(iter(sources)))
                        sources[ref] = _source(store, cache, ref)
                    rows, vecs = sources[ref]
                    vectors[i], valid[i] = vecs[rows[sha]], True
            for s in status:
                counts[s] = counts.get(s, 0) + 1
            buffered.append(pa.table({"item_idx": t.column("item_idx"), "item_id": t.column("item_id"),
                                      "vector": vectors_to_arrow(vectors, valid), "status": t.column("status"),
                                      "error": t.column("error"), "content_sha256": t.column("content_sha256"),
                                      "truncated": t.column("truncated")},
                                     schema=schema))
            if sum(b.num_rows for b in buffered) >= group_rows:
                _write(writer, buffered)
        _write(writer, buffered)
    return counts, used


def _source(store: ArtifactStore, cache: ShardCache, stem: str) -> tuple[dict[str, int], np.ndarray]:
    path: Path = store.path(cache.file(stem))
    if not path.is_file():
        raise ArtifactError(f"encode cache shard {path} vanished during the run; rerun the encode stage")
    t = pq.read_table(path, columns=["content_sha256", "vector", "vector_from"])
    vectors, _ = arrow_to_vectors(t.column("vector"))
    shas, refs = t.column("content_sha256").to_pylist(), t.column("vector_from").to_pylist()
    rows: dict[str, int] = {}
    for i, (sha, ref) in enumerate(zip(shas, refs)):
        if sha is not None and ref is None:
            rows.setdefault(sha, i)
    return rows, vectors


def _write(writer: pq.ParquetWriter, buffered: list[pa.Table]) -> None:
    if buffered:
        table = pa.concat_tables(buffered)
        writer.write_table(table, row_group_size=table.num_rows)
        buffered.clear()
