"""Where each item's content comes from: the text template, image paths, remote image URLs.

A shard's items are described by plain lists (JSON-serialisable, so Ray can ship them):
``kind`` is "text" (``source`` is the text), "file" (an absolute path inside the catalog
root), "url" (http/https), or "" when the item already failed (``status``/``error`` set).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa

Rows = dict[str, list[Any]]  # item_idx, item_id, kind, source, status, error


class SourceError(Exception):
    """An item's content cannot be read; ``code`` becomes its status."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _rows(batch: pa.RecordBatch) -> Rows:
    return {"item_idx": batch.column("item_idx").to_pylist(), "item_id": batch.column("item_id").to_pylist(),
            "kind": [], "source": [], "status": [], "error": []}


def _add(rows: Rows, kind: str, source: str, status: str | None = None, error: str | None = None) -> None:
    rows["kind"].append(kind)
    rows["source"].append(source)
    rows["status"].append(status)
    rows["error"].append(error)


def text_rows(batch: pa.RecordBatch, template: str, fields: list[str]) -> Rows:
    """One shard's texts: ``template`` filled from ``fields`` of each item."""
    from ..models.encoders import apply_text_template

    rows = _rows(batch)
    columns = {f: batch.column(f).to_pylist() for f in fields}
    for i in range(batch.num_rows):
        text = apply_text_template(template, {f: columns[f][i] for f in fields})
        if text:
            _add(rows, "text", text)
        else:
            _add(rows, "", "", "empty_text", f"every field of the template {template!r} is blank")
    return rows


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` with symlinks resolved, or None when it leaves ``root``.

    The check compares resolved path components (``Path.is_relative_to``), not string prefixes,
    so ``/data/catalog-evil`` is not inside ``/data/catalog``.
    """
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root.resolve()) else None


def image_rows(batch: pa.RecordBatch, catalog_root: Path, remote: bool) -> Rows:
    """One shard's image references, with the failures that need no reading already set."""
    rows = _rows(batch)
    root = catalog_root.resolve()
    for ref in batch.column("image").to_pylist():
        ref = (ref or "").strip()
        scheme = ref.split("://", 1)[0].lower() if "://" in ref else ""
        if not ref:
            _add(rows, "", "", "no_image", "the item has no image")
        elif scheme in ("http", "https"):
            if remote:
                _add(rows, "url", ref)
            else:
                _add(rows, "", ref, "remote_disabled", "remote image; set encode.remote_images = true to fetch it")
        elif scheme:
            _add(rows, "", ref, "unsupported_url", f"only http(s) URLs are fetched, got {scheme}://")
        else:
            path = resolve_inside(root, ref)
            if path is None:
                _add(rows, "", ref, "path_escape", f"{ref!r} resolves outside the catalog root {root}")
            else:
                _add(rows, "file", str(path))
    return rows


def item_key(kind: str, source: str, status: str | None) -> str:
    """What a shard's identity depends on per item: the text's hash, a file's size + mtime, the URL."""
    if kind == "text":
        return hashlib.sha256(source.encode("utf-8")).hexdigest()
    if kind == "file":
        try:
            st = os.stat(source)
            return f"{source}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            return f"{source}|absent"
    return f"{kind}|{source}|{status}"


def read_bytes(kind: str, source: str, timeout_s: float, max_bytes: int) -> bytes:
    """The raw bytes of a "file" or "url" item; raises :class:`SourceError`."""
    if kind == "url":
        return fetch_url(source, timeout_s, max_bytes)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise SourceError("missing", f"image file not found: {source}") from e
    except IsADirectoryError as e:
        raise SourceError("missing", f"image path is a folder: {source}") from e
    except OSError as e:
        raise SourceError("unreadable", f"cannot read {source}: {e}") from e
    if not data:
        raise SourceError("zero_byte", f"image file is empty (0 bytes): {source}")
    return data


def fetch_url(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``url`` within ``timeout_s`` seconds in total, refusing bodies over ``max_bytes``."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "clearrec-encode"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise SourceError("too_large", f"{url}: Content-Length {length} exceeds {max_bytes} bytes")
            chunks, size = [], 0
            while chunk := response.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise SourceError("too_large", f"{url}: body exceeds {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise SourceError("timeout", f"{url}: not received within {timeout_s}s")
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise SourceError("http_error", f"{url}: HTTP {e.code} {e.reason}") from e
    except (socket.timeout, TimeoutError) as e:
        raise SourceError("timeout", f"{url}: no response within {timeout_s}s") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise SourceError("timeout", f"{url}: no response within {timeout_s}s") from e
        raise SourceError("fetch_error", f"{url}: {e.reason}") from e
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise SourceError("fetch_error", f"{url}: {type(e).__name__}: {e}") from e
    data = b"".join(chunks)
    if not data:
        raise SourceError("zero_byte", f"{url}: empty body")
    return data
