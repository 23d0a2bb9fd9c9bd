"""Precomputed item vectors (a modality with encoder ``"imported"``) -> the encode stage's feature rows.

Two file kinds, told apart by extension:

- ``.npy`` (float16 / float32 / float64, 2-D, read with ``allow_pickle=False``): row ``r`` is the
  vector of the item whose ``item_id`` is ``r`` written in decimal (MMRec's convention: items are
  numbered by their row). Every catalog item id must be such a row number below the file's row
  count, otherwise the file is refused with an error naming it (a count mismatch is an error, not
  a guess); rows of items the catalog does not have (dropped by ingest) are unused.
- ``.parquet``: columns ``item_id`` (string or integer) and ``vector`` (a list of floats, one
  length throughout); rows are matched by ``item_id``. A repeated id is an error; an item the file
  has no row for gets status ``not_in_file``; rows of ids the catalog lacks are unused.

Per item, a vector with NaN / inf gets status ``non_finite`` and an all-zero vector
``zero_vector`` (both stored null, with the file and row in ``error``), so the project stage's
``encode.missing`` policy treats them as any item without a vector.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline.errors import InputDataError
from ..pipeline.store import vectors_to_arrow

FLOATS = (np.float16, np.float32, np.float64)


def read_vectors(path: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """``(vectors (N, d) float32, found (N,) bool, where (N,) file row per item, rows unused)`` for items ``ids``."""
    if not path.is_file():
        raise InputDataError(f"imported features file {path} does not exist")
    if path.suffix == ".npy":
        return _from_npy(path, ids)
    if path.suffix == ".parquet":
        return _from_parquet(path, ids)
    raise InputDataError(f"imported features file {path}: expected a .npy or a .parquet file")


def _from_npy(path: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputDataError(f"{path} is not a readable .npy array ({e}); save it with numpy.save as a 2-D "
                             "float array, one row per item") from e
    if arr.ndim != 2 or arr.dtype.type not in FLOATS:
        raise InputDataError(f"{path} holds a {arr.ndim}-D {arr.dtype} array; expected 2-D float16/32/64 "
                             "(items x dim)")
    bad = [i for i in ids if not (i.isascii() and i.isdigit())]
    if bad:
        raise InputDataError(f"{path}: a .npy file's row r is the item whose item_id is r, but item ids such as "
                             f"{bad[0]!r} are not row numbers; import a Parquet file with item_id + vector columns")
    rows = np.array([int(i) for i in ids], dtype=np.int64)
    if len(rows) and rows.max() >= arr.shape[0]:
        raise InputDataError(f"{path} has {arr.shape[0]:,} rows but the catalog's item ids go up to "
                             f"{int(rows.max())}: row r must hold the item whose item_id is r")
    vectors = np.asarray(arr[rows], dtype=np.float32)  # (N, d)
    return vectors, np.ones(len(ids), dtype=bool), [f"row {r}" for r in rows], arr.shape[0] - len(set(rows.tolist()))


def _from_parquet(path: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    import pyarrow.compute as pc

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputDataError(f"{path} is not a readable Parquet file ({e})") from e
    missing = [c for c in ("item_id", "vector") if c not in table.column_names]
    if missing:
        raise InputDataError(f"{path} lacks column(s) {missing}; an imported Parquet file has item_id + vector "
                             f"(it has {table.column_names})")
    id_type, vec_type = table.schema.field("item_id").type, table.schema.field("vector").type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise InputDataError(f"{path}: item_id has type {id_type}; expected strings or integers")
    if not (pa.types.is_list(vec_type) or pa.types.is_fixed_size_list(vec_type) or pa.types.is_large_list(vec_type)) \
            or not pa.types.is_floating(vec_type.value_type):
        raise InputDataError(f"{path}: vector has type {vec_type}; expected a list of floats per row")
    raw_ids = table.column("item_id").to_pylist()
    if None in raw_ids:
        raise InputDataError(f"{path}: item_id has null values")
    file_ids = [str(v) for v in raw_ids]
    seen: dict[str, int] = {}
    for r, i in enumerate(file_ids):
        if i in seen:
            raise InputDataError(f"{path}: item_id {i!r} appears twice (rows {seen[i]} and {r})")
        seen[i] = r
    vec = table.column("vector").combine_chunks()
    lengths = set(pc.list_value_length(vec).to_pylist()) - {None}
    if len(lengths) > 1:
        raise InputDataError(f"{path}: vectors have different lengths {sorted(lengths)[:5]}; one length throughout")
    if vec.null_count:
        raise InputDataError(f"{path}: {vec.null_count} rows have a null vector; drop those rows instead")
    dim = lengths.pop() if lengths else 0
    flat = np.asarray(pc.list_flatten(vec).to_numpy(zero_copy_only=False), dtype=np.float32)
    data = flat.reshape(len(file_ids), dim)  # (R, d)
    pos = np.array([seen.get(i, -1) for i in ids], dtype=np.int64)
    found = pos >= 0
    vectors = np.zeros((len(ids), dim), dtype=np.float32)
    vectors[found] = data[pos[found]]
    return vectors, found, [f"row {p}" for p in pos], len(file_ids) - int(found.sum())


def feature_table(ids: list[str], vectors: np.ndarray, found: np.ndarray, where: list[str],
                  source: str) -> tuple[pa.Table, dict[str, int]]:
    """Feature rows (item_idx = position in ``ids``) with per-item status; and the status counts."""
    vectors = np.array(vectors, dtype=np.float32)  # (N, d), a copy: bad rows are zeroed
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.abs(np.where(np.isfinite(vectors), vectors, 1.0)).max(axis=1, initial=0.0) > 0
    status = np.where(~found, "not_in_file", np.where(~finite, "non_finite", np.where(~nonzero, "zero_vector", "ok")))
    ok = status == "ok"
    vectors[~ok] = 0.0
    errors = {"not_in_file": "no row for this item_id", "non_finite": "NaN or infinite values",
              "zero_vector": "all-zero vector"}
    table = pa.table({
        "item_idx": pa.array(np.arange(len(ids)), pa.int64()),
        "item_id": pa.array(ids, pa.string()),
        "vector": vectors_to_arrow(vectors, ok),
        "status": pa.array(status.tolist(), pa.string()),
        "error": pa.array([None if s == "ok" else f"{errors[s]} ({source} {w})" for s, w in zip(status, where)],
                          pa.string()),
        "content_sha256": pa.array([hashlib.sha256(v.tobytes()).hexdigest() for v in vectors], pa.string()),
        "truncated": pa.array(np.zeros(len(ids), dtype=bool)),
    })
    counts: dict[str, int] = {}
    for s in status.tolist():
        counts[s] = counts.get(s, 0) + 1
    return table, counts


def is_normalized(vectors: np.ndarray, ok: np.ndarray) -> bool:
    """Whether every valid row has unit L2 norm (to 1e-3)."""
    norms = np.linalg.norm(vectors[ok], axis=1)
    return bool(len(norms) and np.allclose(norms, 1.0, atol=1e-3))
