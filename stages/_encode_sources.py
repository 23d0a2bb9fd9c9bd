"""Where each item's content comes from: the text template, image paths, remote image URLs.

A shard's items are described by plain lists (JSON-serialisable, so Ray can ship them):
``kind`` is "text" (``source`` is the text, cut to ``encode.max_text_chars``; ``truncated``
says whether it was), "file" (an absolute path inside the catalog root), "url" (http/https),
or "" when the item already failed (``status``/``error`` set).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..models.text import cap_text
from ..pipeline.lazy import lazy_module
from ..pipeline.store import resolve_inside

images = lazy_module("clearrec.models.images")  # Pillow, imported on first use (pipeline/lazy.py)

Rows = dict[str, list[Any]]  # item_idx, item_id, kind, source, status, error, truncated


class SourceError(Exception):
    """An item's content cannot be read; ``code`` becomes its status."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _rows(batch: pa.RecordBatch) -> Rows:
    return {"item_idx": batch.column("item_idx").to_pylist(), "item_id": batch.column("item_id").to_pylist(),
            "kind": [], "source": [], "status": [], "error": [], "truncated": []}


def _add(rows: Rows, kind: str, source: str, status: str | None = None, error: str | None = None,
         truncated: bool = False) -> None:
    rows["kind"].append(kind)
    rows["source"].append(source)
    rows["status"].append(status)
    rows["error"].append(error)
    rows["truncated"].append(truncated)


def text_rows(batch: pa.RecordBatch, template: str, fields: list[str], max_chars: int) -> Rows:
    """One shard's texts: ``template`` filled from ``fields`` of each item, cut to ``max_chars``."""
    rows = _rows(batch)
    columns = {f: batch.column(f).to_pylist() for f in fields}
    for i in range(batch.num_rows):
        text, truncated = cap_text(template, {f: columns[f][i] for f in fields}, max_chars)
        if text:
            _add(rows, "text", text, truncated=truncated)
        else:
            _add(rows, "", "", "empty_text", f"every field of the template {template!r} is blank")
    return rows


def _inside(root: Path, relative: str) -> Path | None:
    """:func:`resolve_inside` with its refusals as item statuses (``bad_path``, ``unreadable``)."""
    try:
        return resolve_inside(root, relative)
    except ValueError as e:
        raise SourceError("bad_path", f"image {e}") from e
    except OSError as e:
        raise SourceError("unreadable", f"image {e}") from e


def image_rows(batch: pa.RecordBatch, catalog_root: Path, remote: bool, column: str = "image") -> Rows:
    """One shard's image references (items column ``column``), with the failures that need no reading already set."""
    rows = _rows(batch)
    root = catalog_root.resolve()
    for ref in batch.column(column).to_pylist():
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
            try:
                path = _inside(root, ref)
            except SourceError as e:
                _add(rows, "", ref, e.code, str(e))
                continue
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


def read_bytes(kind: str, source: str, options: FetchOptions) -> bytes:
    """The raw bytes of a "file" or "url" item; raises :class:`SourceError`."""
    if kind == "url":
        return fetch_url(source, options)
    try:
        return images.read_image_file(source)
    except images.ImageDecodeError as e:
        raise SourceError(e.code, str(e)) from e


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float  # wall-clock deadline for one image: name lookup, connect, every redirect, headers and body
    max_bytes: int  # bodies over this are refused
    max_redirects: int = 5  # redirects followed per image (each hop re-checked)
    allow_private: bool = False  # fetch from loopback / private / link-local / reserved addresses


REDIRECTS = (301, 302, 303, 307, 308)


def fetch_url(url: str, options: FetchOptions) -> bytes:
    """GET ``url`` within ``options.timeout_s`` seconds of wall clock in total, refusing bodies over
    ``options.max_bytes``. Redirects are followed only to http(s), at most ``max_redirects``, and
    every hop's host is resolved and checked: loopback, private, link-local and reserved addresses
    are refused unless ``allow_private``; the connection goes to the address that was checked."""
    deadline = time.monotonic() + options.timeout_s
    current = url
    for _ in range(options.max_redirects + 1):
        parts = urllib.parse.urlsplit(current)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise SourceError("redirect_refused", f"{url}: redirected to {current!r}; only http(s) is followed")
        try:
            status, location, body = _get_once(parts, deadline, options)
        except TimeoutError as e:
            raise SourceError("timeout", f"{url}: not received within {options.timeout_s}s") from e
        except (OSError, ValueError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise SourceError("timeout", f"{url}: not received within {options.timeout_s}s") from e
            raise SourceError("fetch_error", f"{url}: {type(e).__name__}: {e}") from e
        if status in REDIRECTS and location:
            current = urllib.parse.urljoin(current, location)
            continue
        if status >= 300:
            raise SourceError("http_error", f"{url}: HTTP {status}")
        if not body:
            raise SourceError("zero_byte", f"{url}: empty body")
        return body
    raise SourceError("redirect_refused", f"{url}: more than {options.max_redirects} redirects "
                      "(encode.http_max_redirects)")


def _resolve(host: str, port: int, deadline: float) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` within the deadline (it runs on a daemon thread that may outlive it)."""
    out: list[Any] = []

    def lookup() -> None:
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            out.append(e)

    thread = threading.Thread(target=lookup, daemon=True, name="encode-dns")
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    if not out:
        raise TimeoutError
    if isinstance(out[0], OSError):
        raise out[0]
    return out[0]


def _checked_address(host: str, port: int, allow_private: bool, url: str, deadline: float) -> tuple[Any, ...]:
    """The first address of ``host``, refused if any of its addresses is not public."""
    infos = _resolve(host, port, deadline)
    if not infos:
        raise SourceError("fetch_error", f"{url}: {host} has no address")
    if not allow_private:
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if not address.is_global or address.is_multicast:
                raise SourceError("blocked_address", f"{url}: {host} resolves to {address}, a loopback / private / "
                                  "link-local or reserved address; set encode.http_allow_private = true to allow it")
    return infos[0]


def _get_once(parts: urllib.parse.SplitResult, deadline: float,
              options: FetchOptions) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location header, body). A timer shuts the socket at ``deadline``, so a
    server dripping bytes (even in its headers) cannot hold the caller past it."""
    url = urllib.parse.urlunsplit(parts)
    host = parts.hostname
    if not host:
        raise SourceError("fetch_error", f"{url}: no host")
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    family, socktype, proto, _, address = _checked_address(host, port, options.allow_private, url, deadline)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock = socket.socket(family, socktype, proto)
    timer = threading.Timer(remaining, _shut, args=(sock,))
    timer.daemon = True
    timer.start()
    conn = None
    try:
        sock.settimeout(remaining)
        sock.connect(address)
        if parts.scheme.lower() == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            timer.args = (sock,)  # read when the timer fires
            sock.do_handshake()
        conn = http.client.HTTPConnection(host, port, timeout=remaining)
        conn.sock = sock
        conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                     headers={"User-Agent": "clearrec-encode"})
        response = conn.getresponse()
        if response.status >= 300:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > options.max_bytes:
            raise SourceError("too_large", f"{url}: Content-Length {length} exceeds {options.max_bytes} bytes")
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > options.max_bytes:
                raise SourceError("too_large", f"{url}: body exceeds {options.max_bytes} bytes")
            chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise TimeoutError
        if time.monotonic() >= deadline:  # the timer cut the body short
            raise TimeoutError
        return response.status, None, b"".join(chunks)
    finally:
        timer.cancel()
        if conn is not None:
            conn.close()
        sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
