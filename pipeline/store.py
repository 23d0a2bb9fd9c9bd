"""Artifact store: one work directory, atomic writes, checked reads.

Every write goes to a temporary file in the destination folder and is renamed into place
with ``os.replace``, so a crash mid-write leaves the previous artifact intact. Parquet is
written with pyarrow and carries clearrec metadata as JSON under the schema key
``clearrec``; reads check required columns. Tensors are stored as safetensors (never
pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ArtifactError, IntegrityError

META_KEY = b"clearrec"
_UMASK = os.umask(0o022)  # read the process umask (set it back at once) so artifacts get normal permissions
os.umask(_UMASK)
ARTIFACT_MODE = 0o666 & ~_UMASK  # every artifact's permission bits (0644 under the usual umask 022)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ArtifactStore:
    """A work directory whose files are named by POSIX-style relative paths."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- names and paths -------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Absolute path of artifact ``name``; refuses names that leave the work directory."""
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ArtifactError(f"artifact name {name!r} must be a relative path inside the work directory")
        return self.root.joinpath(*rel.parts)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def checksum(self, name: str) -> str:
        p = self.path(name)
        if not p.is_file():
            raise ArtifactError(f"artifact {name} not found in {self.root}")
        return sha256_file(p)

    def verify(self, name: str, expected_sha256: str) -> None:
        """Raise :class:`IntegrityError` unless ``name``'s checksum is ``expected_sha256``."""
        actual = self.checksum(name)
        if actual != expected_sha256:
            raise IntegrityError(
                f"{self.path(name)} has checksum {actual[:12]}..., the manifest records "
                f"{expected_sha256[:12]}...; the file was modified or corrupted. Rebuild it with "
                f"'clearrec run --force --only <stage>'."
            )

    # ---- atomic writing --------------------------------------------------------------
    @contextmanager
    def atomic(self, name: str) -> Iterator[Path]:
        """Yield a temporary path; on normal exit it is renamed to ``name``, on error removed."""
        dest = self.path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                # one rule for every artifact: the mode open() would give (mkstemp makes 0600, and a writer
                # such as safetensors may recreate the file), set after the writer is done
                os.fchmod(f.fileno(), ARTIFACT_MODE)
                os.fsync(f.fileno())
            os.replace(tmp_path, dest)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()

    def write_bytes(self, name: str, data: bytes) -> Path:
        with self.atomic(name) as tmp:
            tmp.write_bytes(data)
        return self.path(name)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")

    def read_json(self, name: str) -> Any:
        p = self.path(name)
        if not p.is_file():
            raise ArtifactError(f"{name} not found in {self.root}; run the stage that writes it first")
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{p} is not valid JSON ({e}); rerun the stage that writes it with --force") from e

    # ---- Parquet ---------------------------------------------------------------------
    def write_parquet(
        self,
        name: str,
        table: pa.Table,
        metadata: Mapping[str, Any] | None = None,
        row_group_size: int | None = None,
    ) -> Path:
        """Write ``table`` atomically; ``metadata`` is stored as JSON under the ``clearrec`` key."""
        if metadata is not None:
            schema_meta = dict(table.schema.metadata or {})
            schema_meta[META_KEY] = json.dumps(metadata, sort_keys=True, default=_json_default).encode()
            table = table.replace_schema_metadata(schema_meta)
        with self.atomic(name) as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        return self.path(name)

    def write_parquet_batches(self, name: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch],
                              metadata: Mapping[str, Any] | None = None) -> Path:
        """:meth:`write_parquet` of a table given as record batches, each written as it comes (one row
        group per batch), so that the whole table is never held in memory at once."""
        if metadata is not None:
            schema = schema.with_metadata({**(schema.metadata or {}), META_KEY: json.dumps(
                metadata, sort_keys=True, default=_json_default).encode()})
        with self.atomic(name) as tmp:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for batch in batches:
                    writer.write_batch(batch)
        return self.path(name)

    def read_parquet(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        required: Sequence[str] | Mapping[str, pa.DataType] | None = None,
    ) -> pa.Table:
        """Read ``name``; raise :class:`ArtifactError` naming the file if required columns are missing."""
        p = self.path(name)
        if not p.is_file():
            raise ArtifactError(f"{name} not found in {self.root}; run the stage that writes it first")
        try:
            schema = pq.read_schema(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise ArtifactError(f"{p} is not a readable Parquet file ({e}); rerun its stage with --force") from e
        check_schema(schema, required, str(p))
        return pq.read_table(p, columns=list(columns) if columns is not None else None)

    def parquet_file(self, name: str) -> pq.ParquetFile:
        """Open ``name`` for streaming reads (row groups / ``iter_batches``)."""
        p = self.path(name)
        if not p.is_file():
            raise ArtifactError(f"{name} not found in {self.root}; run the stage that writes it first")
        return pq.ParquetFile(p)

    def parquet_metadata(self, name: str) -> dict[str, Any]:
        """The clearrec metadata dict stored in ``name``'s schema (empty if none)."""
        schema = pq.read_schema(self.path(name))
        raw = (schema.metadata or {}).get(META_KEY)
        return json.loads(raw) if raw else {}

    # ---- tensors (safetensors) -------------------------------------------------------
    def write_tensors(self, name: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
        """Save numpy arrays or torch tensors with safetensors (no pickle)."""
        from safetensors.numpy import save_file

        arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in tensors.items()}
        with self.atomic(name) as tmp:
            save_file(arrays, str(tmp), metadata=dict(metadata) if metadata else None)
        return self.path(name)

    def read_tensors(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Load a safetensors file as numpy arrays plus its string metadata."""
        from safetensors import safe_open

        p = self.path(name)
        if not p.is_file():
            raise ArtifactError(f"{name} not found in {self.root}; run the stage that writes it first")
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise ArtifactError(f"{p} is not a readable safetensors file ({e}); rerun its stage with --force") from e


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` with symlinks resolved, or None when it leaves ``root`` (the one containment check).

    The check compares resolved path components (``Path.is_relative_to``), not string prefixes,
    so ``/data/catalog-evil`` is not inside ``/data/catalog``. Raises ``ValueError`` for a path
    holding a NUL byte and ``OSError`` for one that cannot be resolved (a symlink loop).
    """
    if "\x00" in relative:
        raise ValueError(f"path {relative!r} holds a NUL byte")
    try:
        candidate = (root / relative).resolve()
    except RuntimeError as e:  # a symlink loop (before Python 3.13)
        raise OSError(f"path {relative!r} cannot be resolved ({e}): a symlink loop?") from e
    return candidate if candidate.is_relative_to(root.resolve()) else None


def check_schema(
    schema: pa.Schema,
    required: Sequence[str] | Mapping[str, pa.DataType] | None,
    where: str,
) -> None:
    """Raise :class:`ArtifactError` if ``schema`` lacks a required column or has the wrong type."""
    if not required:
        return
    names = set(schema.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise ArtifactError(f"{where} lacks column(s) {missing}; it has {schema.names}. Rerun its stage with --force.")
    if isinstance(required, Mapping):
        for col, dtype in required.items():
            if dtype is not None and not schema.field(col).type.equals(dtype):
                raise ArtifactError(
                    f"{where}: column {col!r} has type {schema.field(col).type}, expected {dtype}. "
                    "Rerun its stage with --force."
                )


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """(N, d) float32 -> Arrow ``fixed_size_list<float32>[d]``; rows where ``valid`` is False are null."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(flat, d, mask=mask)


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Arrow fixed-size-list column -> ((N, d) float32 with zeros for nulls, (N,) bool valid)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_fixed_size_list(column.type):
        raise ArtifactError(f"vector column has type {column.type}, expected fixed_size_list<float32>")
    d = column.type.list_size
    valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    flat = column.values.slice(column.offset * d, len(column) * d)  # null rows keep their (unused) slots
    out = np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), d)
    out[~valid] = 0.0
    return out, valid


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
