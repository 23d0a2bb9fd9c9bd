"""Streaming reads for the project stage: feature files chunk by chunk, and the train items.

Read buffering on and Arrow's pre-buffering off keep memory bounded by the chunk, not the
row group (encode may write row groups of a million rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline.errors import ArtifactError
from ..pipeline.lazy import lazy_module
from ..pipeline.store import ArtifactStore, check_schema
from ..pipeline.workdir import INTERACTIONS

pc = lazy_module("pyarrow.compute")  # imported on first use (pipeline/lazy.py)

READ_BUFFER = 8 << 20  # bytes: column chunks are streamed through this buffer, not read whole


@dataclass
class Source:
    modality: str
    name: str
    file: pq.ParquetFile
    dim: int
    meta: dict[str, Any]


def open_features(store: ArtifactStore, name: str, modality: str) -> Source:
    """Open a features file for streaming; check its columns and vector type."""
    schema = store.parquet_file(name).schema_arrow  # the store's checks and errors
    try:
        f = pq.ParquetFile(store.path(name), pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{store.path(name)} is not a readable Parquet file ({e}); "
                            "rerun 'clearrec run --force --only encode'") from e
    check_schema(schema, {"item_idx": pa.int64(), "vector": None}, str(store.path(name)))
    vtype = schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_float32(vtype.value_type):
        raise ArtifactError(f"{store.path(name)}: column 'vector' has type {vtype}, expected "
                            "fixed_size_list<float32>; rerun 'clearrec run --force --only encode'")
    return Source(modality, name, f, vtype.list_size, store.parquet_metadata(name))


def iter_aligned(sources: list[Source], chunk_rows: int) -> Iterator[list[pa.RecordBatch]]:
    """Chunks of ``chunk_rows`` rows read together from every source; their item_idx must agree."""
    rows = {s.name: s.file.metadata.num_rows for s in sources}
    if len(set(rows.values())) > 1:
        raise ArtifactError(f"feature files have different row counts {rows}; they must hold one row per item "
                            "in the same order: rerun 'clearrec run --force --only encode'")
    readers = [_rechunk(s.file.iter_batches(batch_size=chunk_rows), chunk_rows) for s in sources]
    offset = 0
    for batches in zip(*readers):
        idx = [b.column("item_idx") for b in batches]
        for s, other in zip(sources[1:], idx[1:]):
            if not other.equals(idx[0]):
                raise ArtifactError(f"{s.name} and {sources[0].name} list different items in rows {offset}.."
                                    f"{offset + len(idx[0]) - 1}; rerun 'clearrec run --force --only encode'")
        offset += batches[0].num_rows
        out = list(batches)
        del batches, idx  # hold no chunk while the next one is read
        yield out
        del out


def _rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream of record batches into batches of exactly ``rows`` rows (the last may be shorter)."""
    buf: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        if not buf and b.num_rows == rows:
            yield b
            continue
        buf.append(b)
        have += b.num_rows
        while have >= rows:
            table = pa.Table.from_batches(buf)
            yield _single_batch(table.slice(0, rows))
            rest = table.slice(rows)
            buf, have = [b for b in rest.to_batches() if b.num_rows], rest.num_rows
    if have:
        yield _single_batch(pa.Table.from_batches(buf))


def _single_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if len(batches) == 1 else pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def train_items(store: ArtifactStore) -> np.ndarray:
    """Sorted unique item_idx with at least one train interaction (streamed)."""
    f = store.parquet_file(INTERACTIONS)
    check_schema(f.schema_arrow, {"item_idx": pa.int64(), "split": None}, str(store.path(INTERACTIONS)))
    parts = []
    for b in f.iter_batches(batch_size=1 << 20, columns=["item_idx", "split"]):
        keep = pc.equal(b.column("split"), "train").to_numpy(zero_copy_only=False)
        parts.append(np.unique(b.column("item_idx").to_numpy(zero_copy_only=False)[keep.astype(bool)]))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def sample_rows(fit_rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted row positions of a seeded sample of at most ``size`` fit rows."""
    rows = np.flatnonzero(fit_rows)
    if len(rows) <= size:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
