"""Loading, checking and query encoding behind :mod:`clearrec.pipeline.api`.

- :class:`LoadedIndex`: one FAISS index deserialised from bytes whose SHA-256 was checked,
  with its row -> item_id mapping;
- :func:`verified_info`: ``index/index_info.json``, checked against the manifest;
- :class:`QueryEncoder`: the catalog's encoders, CLEAR projector, fill vectors and content
  layout, for queries and new items (the text encoder optionally in child processes,
  :mod:`._encoder_process`);
- :func:`load_content_pathway`: the trained backbone's content layer alone (VBPR), for new items;
- :class:`QueryBatcher`: concurrent queries collected on the encoder thread, texts encoded together;
- :func:`decode_query_image`: a query image decoded reduced to the encoder's input size;
- :class:`RWLock`: many readers or one writer.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import io
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models import ann
from ..models.content import ContentLayout
from ._encoder_process import TextEncoderPool
from .errors import ArtifactError, EncoderUnavailableError, IntegrityError
from .store import ArtifactStore, arrow_to_vectors, resolve_inside
from .threads import torch_threads
from .workdir import (
    CONTENT_PATHWAY,
    FILL,
    INDEX_INFO,
    INTERACTIONS,
    ITEMS,
    MODEL_JSON,
    PROJECTOR,
    PROJECTOR_JSON,
    USER_VECTORS,
    stage_outputs,
)

BATCH_WINDOW_S = 0.003  # a query waits at most this long for others to share its forward pass
MAX_BATCH = 128  # most queries encoded in one forward pass
QUERY_TORCH_THREADS = 1  # torch threads of a query forward pass: one thread keeps a row independent of its batch
TEXT_PAD = 4  # text queries are padded to a multiple of this many tokens (masked), so rows batch exactly
MAX_DECODES = 2  # query images decoded at the same time (each may briefly hold its full-size pixels)
TRIM_PIXELS = 4_000_000  # after decoding an image this large, freed memory is handed back to the OS


class LoadedIndex:
    """One FAISS index, verified and loaded, with its row -> item_id mapping."""

    def __init__(self, store: ArtifactStore, entry: Mapping[str, Any]):
        self.name = Path(entry["file"]).stem
        data = verified_bytes(store, entry["file"], entry["sha256"])
        self.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        ivf = ann.ivf_part(self.index)
        if ivf is not None:
            ivf.make_direct_map()  # reconstruct(row) for similar()
        self.knob = ann.knob(self.index)  # "efSearch" / "nprobe" / None, looked up once (not per request)
        ids = pq.read_table(pa.BufferReader(verified_bytes(store, entry["ids_file"], entry["ids_sha256"])))
        if ids.num_rows != self.index.ntotal:
            raise IntegrityError(f"{entry['ids_file']} has {ids.num_rows} rows but {entry['file']} has "
                                 f"{self.index.ntotal}; rebuild with 'clearrec run --force --only index'")
        self.item_ids: list[str] = ids["item_id"].to_pylist()
        self.item_idx = ids["item_idx"].to_numpy()
        self.row_of = {item_id: row for row, item_id in enumerate(self.item_ids)}

    def add(self, vectors: np.ndarray, item_ids: list[str]) -> None:
        start = self.index.ntotal
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.item_ids.extend(item_ids)
        self.row_of.update({item_id: start + i for i, item_id in enumerate(item_ids)})


def verified_info(store: ArtifactStore) -> dict[str, Any]:
    """``index/index_info.json``, whose checksum must match the manifest's (when it has one)."""
    if not store.exists(INDEX_INFO):
        raise ArtifactError(f"{store.path(INDEX_INFO)} not found: build the index with 'clearrec run' "
                            "(or 'clearrec run --only index')")
    recorded = stage_outputs(store, "index")
    data = verified_bytes(store, INDEX_INFO, recorded.get(INDEX_INFO))
    try:
        info = json.loads(data)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{store.path(INDEX_INFO)} is not valid JSON; rebuild with "
                            "'clearrec run --force --only index'") from e
    for entry in (info.get("items"), info.get("content")):
        for key, sha_key in (("file", "sha256"), ("ids_file", "ids_sha256")):
            if entry and entry[key] in recorded and recorded[entry[key]] != entry[sha_key]:
                raise IntegrityError(f"{entry[key]}: index_info.json and manifest.json record different "
                                     "checksums; rebuild with 'clearrec run --force --only index'")
    return info


def verified_bytes(store: ArtifactStore, name: str, expected: str | None, stage: str = "index") -> bytes:
    """The bytes of ``name``, returned only if their SHA-256 is ``expected`` (when one is given)."""
    path = store.path(name)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; rebuild with 'clearrec run --force --from {stage}'")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise IntegrityError(f"{path} has checksum {actual[:12]}..., {expected[:12]}... was recorded when it was "
                             "built; the file was modified or corrupted. Rebuild it with "
                             f"'clearrec run --force --from {stage}'.")
    return data


def read_titles(store: ArtifactStore) -> dict[str, str]:
    table = store.read_parquet(ITEMS, columns=["item_id", "title"], required=["item_id", "title"])
    return {i: (t or "") for i, t in zip(table["item_id"].to_pylist(), table["title"].to_pylist())}


def read_users(store: ArtifactStore) -> tuple[dict[str, int], np.ndarray]:
    table = store.read_parquet(USER_VECTORS, required=["user_idx", "user_id", "vector"])
    vectors, _ = arrow_to_vectors(table["vector"])  # (U, d)
    return {u: r for r, u in enumerate(table["user_id"].to_pylist())}, vectors


def read_seen(store: ArtifactStore, items: LoadedIndex) -> dict[int, np.ndarray]:
    """user row (in user_vectors) -> sorted rows of the items index the user interacted with."""
    users = store.read_parquet(USER_VECTORS, columns=["user_idx"])["user_idx"].to_numpy()
    inter = store.read_parquet(INTERACTIONS, columns=["user_idx", "item_idx"],
                               required=["user_idx", "item_idx"])
    u, i = inter["user_idx"].to_numpy(), inter["item_idx"].to_numpy()
    row_of_item = np.full(int(max(items.item_idx.max(initial=-1), i.max(initial=-1))) + 1, -1, dtype=np.int64)
    row_of_item[items.item_idx] = np.arange(len(items.item_idx))
    row_of_user = {int(x): r for r, x in enumerate(users)}
    rows = row_of_item[i]
    order = np.lexsort((rows, u))
    u, rows = u[order], rows[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    out = {}
    for uu, rr in zip(np.split(u, bounds), np.split(rows, bounds)):
        if len(uu) and int(uu[0]) in row_of_user:
            out[row_of_user[int(uu[0])]] = np.unique(rr[rr >= 0])
    return out


class QueryEncoder:
    """Query text / images and new catalog rows -> content-index vectors.

    Per modality: the catalog's encoder (loaded on first use) -> the saved CLEAR projector
    (only if the catalog's features were projected) -> its block of the content layout the
    index was built with (``index_info.json``). ``blocks``: per modality, how its queries are
    encoded (encoder identity, weights, template, missing policy, projector). With
    ``text_processes`` (> 0) a text encoder runs in that many child processes
    (:class:`TextEncoderPool`) and text query batches have as many threads to run on, so that
    batches run at the same time.
    """

    def __init__(self, store: ArtifactStore, layout: ContentLayout | None, blocks: dict[str, dict[str, Any]],
                 encoders: Mapping[str, Any], max_pixels: int, device: str, text_processes: int = 0):
        self.store, self.layout, self.blocks = store, layout, blocks
        self.max_pixels, self.device, self.text_processes = max_pixels, device, text_processes
        self._encoders: dict[str, Any] = {}
        for modality, enc in encoders.items():
            self._encoders[modality] = self._checked(modality, enc)
        self._projector: Any = None
        self._fill: dict[str, np.ndarray] = {}
        self._load_lock = threading.Lock()
        # every encoder call runs on this one thread: torch and FAISS share OpenMP settings,
        # which are per thread, so a fixed thread makes a query's vector the same bytes
        # whichever thread (HTTP worker, caller) asks
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clearrec-encode")
        self._batcher = QueryBatcher(self._worker, self._encode_batch)
        # batches for encoder processes run on threads of their own (the forward pass is in the child)
        self._pool_workers = ThreadPoolExecutor(max_workers=max(1, text_processes), thread_name_prefix="clearrec-pool")
        self._pool_batcher = QueryBatcher(self._pool_workers, self._encode_batch)
        self._decodes = threading.BoundedSemaphore(MAX_DECODES)

    def block(self, modality: str) -> dict[str, Any]:
        if modality not in self.blocks:
            raise ArtifactError(f"the catalog has no {modality} features (encoder 'none' or no content index), "
                                f"so {modality} queries cannot be answered")
        return self.blocks[modality]

    def kind(self, modality: str) -> str:
        """"text", "image" or "imported" (a modality with no encoder: it serves ``similar`` only)."""
        b = self.block(modality)
        return b.get("kind") or ("imported" if b.get("encoder") == "imported" else
                                 "text" if modality == "text" else "image")

    def of_kind(self, kind: str) -> list[str]:
        """The modalities whose queries are of ``kind`` ("text" / "image"), in block order."""
        names = [m for m in self.blocks if self.kind(m) == kind]
        if not names:
            raise ArtifactError(f"the catalog has no modality with a {kind} encoder (its modalities: "
                                + ", ".join(f"{m} ({self.kind(m)})" for m in self.blocks) + f"), so {kind} queries "
                                "cannot be answered")
        return names

    def encoder(self, modality: str) -> Any:
        block = self.block(modality)
        with self._load_lock:
            if modality not in self._encoders:
                from ..models.encoders import load_image_encoder, load_text_encoder

                identity = block["encoder"]
                if identity in (None, "imported"):
                    raise EncoderUnavailableError(f"the catalog's {modality} features were imported without an "
                                                  f"encoder, so {modality} queries cannot be encoded")
                if self.kind(modality) == "text" and self.text_processes > 0:
                    enc = TextEncoderPool(identity, self.text_processes, device=self.device,
                                          normalize=block["encoder_normalized"], torch_threads=QUERY_TORCH_THREADS)
                elif self.kind(modality) == "text":
                    enc = load_text_encoder(identity, device=self.device, normalize=block["encoder_normalized"])
                else:
                    enc = load_image_encoder(identity, device=self.device, normalize=block["encoder_normalized"],
                                             max_pixels=self.max_pixels)
                self._encoders[modality] = self._checked(modality, enc)
            return self._encoders[modality]

    def _encode_batch(self, modality: str, payloads: list[Any]) -> list[Any]:
        """The batcher's forward pass: :func:`encode_rows` here, or in one of the encoder's processes."""
        enc = self.encoder(modality)
        if isinstance(enc, TextEncoderPool):
            return enc.encode_rows(payloads)
        return encode_rows(enc, self.kind(modality), payloads)

    def close(self) -> None:
        """Stop encoder processes and the encoder thread."""
        for enc in self._encoders.values():
            if isinstance(enc, TextEncoderPool):
                enc.close()
        self._worker.shutdown(wait=False)
        self._pool_workers.shutdown(wait=False)

    def _checked(self, modality: str, enc: Any) -> Any:
        """``enc`` if it is the catalog's encoder: same identity and, where both are known, same weights."""
        block = self.block(modality)
        want, sha = block["encoder"], block.get("weights_sha256")
        have_sha = getattr(enc, "weights_sha256", None)
        if getattr(enc, "identity", None) != want or (sha and have_sha and sha != have_sha):
            raise EncoderUnavailableError(f"{modality} encoder {getattr(enc, 'identity', None)!r} is not the one the "
                                          f"catalog was encoded with ({want!r}, weights {str(sha)[:12]}); queries "
                                          "must use the same encoder: rerun 'clearrec run --from encode'")
        return enc

    def projector(self) -> Any:
        with self._load_lock:
            if self._projector is None:
                from safetensors.numpy import load as load_tensors

                from ..models.clear_multi import MultiClearProjector

                sha = next(b["projector"] for b in self.blocks.values() if b["clear_enabled"])
                tensors = load_tensors(verified_bytes(self.store, PROJECTOR, sha, "project"))
                self._projector = MultiClearProjector.from_state(tensors, self.store.read_json(PROJECTOR_JSON))
            return self._projector

    def project(self, modality: str, raw: np.ndarray) -> np.ndarray:
        """Encoder output (B, d) -> as the catalog's *_clear features (CLEAR-projected where they were)."""
        x = np.asarray(raw, dtype=np.float32)
        if not self.block(modality)["clear_enabled"]:
            return x
        return self.projector().transform(modality, x)

    def holds_projected(self, modality: str) -> bool:
        """Whether the content index holds the modality's projected features (an index built before
        ``index.content_features`` existed held them wherever CLEAR projected)."""
        b = self.block(modality)
        return bool(b.get("projected", b["clear_enabled"]))

    def content_block(self, modality: str, raw: np.ndarray) -> np.ndarray:
        """Encoder output (B, d) -> what the content index holds for the modality (raw or projected)."""
        if self.holds_projected(modality):
            return self.project(modality, raw)
        return np.asarray(raw, dtype=np.float32)

    def encode(self, modality: str, payloads: list[Any]) -> np.ndarray:
        """Texts (str) or images (bytes / PIL-decodable path) -> encoder output (B, d)."""
        from ..models.images import safe_open_image

        enc = self.encoder(modality)
        image = self.kind(modality) == "image"
        batch = [safe_open_image(p, self.max_pixels) for p in payloads] if image else payloads
        return self.run(enc.encode, batch)

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the encoder thread."""
        return self._worker.submit(fn, *args).result()

    def query(self, kind: str, payload: Any) -> np.ndarray:
        """One text / image query -> (1, D): a content row with the blocks of that kind (zeros elsewhere).

        Every modality with an encoder of ``kind`` encodes the query into its block. Image bytes
        are decoded here (at most :data:`MAX_DECODES` at once, reduced to the largest encoder
        input size); the forward pass is shared with concurrent queries (:class:`QueryBatcher`)
        and gives the vector this query would get alone.
        """
        names = self.of_kind(kind)
        encoders = {m: self.encoder(m) for m in names}
        if kind == "image":
            sizes = [max(s) for s in (getattr(e, "image_size", None) for e in encoders.values()) if s]
            with self._decodes:
                payload = decode_query_image(payload, self.max_pixels, max(sizes) if sizes else None)
        blocks = {m: self.content_block(m, self._batcher_of(encoders[m]).submit(m, payload)[None, :])
                  for m in names}  # (1, d) each
        return self.layout.rows(blocks)

    def _batcher_of(self, enc: Any) -> QueryBatcher:
        """The batcher of an encoder: an encoder pool's batches run in parallel, the others on the encoder thread."""
        return self._pool_batcher if isinstance(enc, TextEncoderPool) else self._batcher

    def item_features(self, rows: list[dict[str, Any]],
                      catalog_root: Path | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """New rows -> per modality, (content-index features, features as the catalog's *_clear), (B, d) each.

        A row without a payload for a modality (and every row, for an imported modality: it has no
        encoder) gets the vector the catalog's items without one got.
        """
        from ..models.text import apply_text_template

        content: dict[str, np.ndarray] = {}
        clear: dict[str, np.ndarray] = {}
        has_any = np.zeros(len(rows), dtype=bool)
        for modality, b in self.blocks.items():
            kind = self.kind(modality)
            if kind == "text":
                template = b.get("text_template") or "{title}. {description}"
                payloads = [apply_text_template(template, r) for r in rows]
            elif kind == "image":
                payloads = [image_payload(r.get(b.get("column") or "image"), catalog_root) for r in rows]
            else:
                payloads = [None] * len(rows)
            has = np.array([bool(p) for p in payloads], dtype=bool)
            x = np.zeros((len(rows), b["dim"]), dtype=np.float32)  # (B, d) as *_clear
            c = np.zeros_like(x)  # as the content index
            if has.any():
                raw = self.encode(modality, [p for p in payloads if p])
                x[has], c[has] = self.project(modality, raw), self.content_block(modality, raw)
            if (~has).any() and b.get("missing") == "mean":
                x[~has] = self.fill(modality)
                c[~has] = self.fill(modality if self.holds_projected(modality) else f"{modality}.raw")
            clear[modality], content[modality] = x, c
            has_any |= has
        if not has_any.all():
            raise ValueError(f"rows {np.flatnonzero(~has_any).tolist()} have nothing to encode (no text, no "
                             f"image) for the modalities {list(self.blocks)}")
        return content, clear

    def fill(self, modality: str) -> np.ndarray:
        """The vector the project stage gave the catalog's items without one (``clear/fill.safetensors``), (d,);
        ``<name>.raw``: the same before projection (what a raw content block holds)."""
        with self._load_lock:
            if not self._fill:
                from safetensors.numpy import load as load_tensors

                sha = stage_outputs(self.store, "project").get(FILL)
                if not self.store.exists(FILL):
                    raise ArtifactError(f"{self.store.path(FILL)} not found; rerun 'clearrec run --from project'")
                self._fill = load_tensors(verified_bytes(self.store, FILL, sha, "project"))
        if modality not in self._fill:
            raise ArtifactError(f"{FILL} has no {modality} vector; rerun 'clearrec run --from project'")
        return self._fill[modality]

    def content(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Per-modality content-block features (as :meth:`item_features` gives them) -> content-index rows (B, D)."""
        return self.layout.rows(features)


class QueryBatcher:
    """Dynamic batching of concurrent queries on the encoder thread.

    :meth:`submit` queues one payload and waits for its vector. The first query to arrive
    schedules a drain on the encoder thread, which waits up to :data:`BATCH_WINDOW_S` (less
    once :data:`MAX_BATCH` queries wait), takes what has queued, and encodes it per modality
    with :func:`encode_rows`; queries arriving meanwhile form the next batch. A failure is
    raised to the queries of the group that failed, and only to them.
    """

    def __init__(self, worker: ThreadPoolExecutor, encode: Any, window_s: float = BATCH_WINDOW_S,
                 max_batch: int = MAX_BATCH):
        self._worker, self._encode, self.window_s, self.max_batch = worker, encode, window_s, max_batch
        self._pending: list[tuple[str, Any, Future]] = []
        self._cond = threading.Condition()
        self._scheduled = False
        self.batches = 0  # forward-pass groups run so far (for tests and health checks)

    def submit(self, modality: str, payload: Any) -> np.ndarray:
        """``payload``'s encoder output, (d,) float32."""
        future: Future = Future()
        with self._cond:
            self._pending.append((modality, payload, future))
            if not self._scheduled:
                self._scheduled = True
                self._worker.submit(self._drain)
            self._cond.notify_all()
        return future.result()

    def _drain(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._pending) >= self.max_batch, timeout=self.window_s)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if self._pending:
                self._worker.submit(self._drain)
            else:
                self._scheduled = False
        groups: dict[str, list[tuple[Any, Future]]] = {}
        for modality, payload, future in batch:
            groups.setdefault(modality, []).append((payload, future))
        for modality, items in groups.items():
            try:
                rows = self._encode(modality, [p for p, _ in items])
            except BaseException as e:  # noqa: BLE001 - handed to the waiting queries
                rows = [e] * len(items)
            self.batches += 1
            for (_, future), row in zip(items, rows):
                if isinstance(row, BaseException):
                    future.set_exception(row)
                else:
                    future.set_result(row)


def freeze_heap() -> int:
    """Collect garbage once, then take every object alive now out of the collector's view
    (:func:`gc.freeze`); returns how many were frozen.

    Called once a serving process has loaded what it keeps (modules, index, encoder): a full
    collection then walked all of those objects each time it ran, a 300-400 ms pause of the
    server and of each text encoder process under load (measured in ``benchmarks/serve.py``),
    during which every request waited. Objects made later are collected as before.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def encode_rows(enc: Any, kind: str, payloads: list[Any], threads: int = QUERY_TORCH_THREADS) -> list[Any]:
    """Encoder output per payload, (d,) each (or the exception of a payload that failed).

    Texts for an encoder whose tokens carry an attention mask (sentence-transformers) are
    padded to a multiple of :data:`TEXT_PAD` tokens and go through one forward pass (a BERT
    encoder: :meth:`~clearrec.models.encoders.SentenceTextEncoder.encode_packed`, all lengths in
    one pass; another: one pass per padded length) on ``threads`` torch thread(s)
    (:data:`QUERY_TORCH_THREADS` unless the caller, such as the encoder process, says otherwise):
    each row is then the bytes the text gives alone, padded the same way (measured on CPU with
    MiniLM: 472 rows of 3-23 tokens in batches of 2-128, every one bitwise equal to its
    single-query vector; the padding length itself does change the last bits, hence a fixed
    rule per length). The multiple is small because a forward pass costs about linearly in
    tokens: padding a 4-token query to 16 quadrupled its cost. Images (CLIP's patch tokens)
    measured not to batch exactly, so image queries and other encoders run one forward pass per
    query (on the same encoder thread).
    """
    with torch_threads(threads):
        tokens = [_guarded(lambda p=p: enc.tokenize([p])) for p in payloads] if kind == "text" else []
        if not hasattr(enc, "encode_tokens") or not any(
                isinstance(t, Mapping) and "attention_mask" in t for t in tokens):
            return [_guarded(lambda p=p: enc.encode([p])[0]) for p in payloads]
        pad_id = getattr(getattr(getattr(enc, "model", None), "tokenizer", None), "pad_token_id", None) or 0
        padded = [t if isinstance(t, BaseException) else _guarded(lambda t=t: _pad_tokens(t, pad_id)) for t in tokens]
        rows: list[Any] = [t if isinstance(t, BaseException) else None for t in padded]
        live = [i for i, t in enumerate(padded) if not isinstance(t, BaseException)]
        groups: dict[int, list[int]] = {}
        if getattr(enc, "packs", False):  # one forward pass for every length
            def encode(members: list[int]) -> Any:
                return enc.encode_packed([padded[i] for i in members])

            if live:
                groups[0] = live
        else:  # one forward pass per padded length
            def encode(members: list[int]) -> Any:
                return enc.encode_tokens(_concat([padded[i] for i in members]))

            for i in live:
                groups.setdefault(int(padded[i]["input_ids"].shape[1]), []).append(i)
        for members in groups.values():
            out = _guarded(lambda m=members: encode(m))
            for j, i in enumerate(members):
                rows[i] = out if isinstance(out, BaseException) else out[j]
        return rows


def _guarded(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - returned to the one query it belongs to
        return e


def _pad_tokens(tokens: Mapping[str, Any], pad_id: int) -> dict[str, Any]:
    """(1, L) token tensors -> (1, L') with L' the next multiple of TEXT_PAD; padding masked out."""
    import torch

    length = int(tokens["input_ids"].shape[1])
    target = -(-length // TEXT_PAD) * TEXT_PAD
    out: dict[str, Any] = {}
    for key, value in tokens.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length:
            pad = torch.full((1, target), pad_id if key == "input_ids" else 0, dtype=value.dtype)
            pad[:, :length] = value
            value = pad
        out[key] = value
    return out


def _concat(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {k: torch.cat([t[k] for t in tokens]) if isinstance(v, torch.Tensor) else v for k, v in tokens[0].items()}


def decode_query_image(data: bytes, max_pixels: int, reduce_to: int | None) -> Any:
    """A query image -> RGB ``PIL.Image``, guarded as catalog images are, decoded reduced.

    ``reduce_to`` (the encoder's input side, pixels): an image whose shorter side is at least
    twice that is decoded at an integer reduction keeping the shorter side >= ``reduce_to``
    (:func:`safe_open_image`). After an image of :data:`TRIM_PIXELS` or more, freed memory is
    returned to the OS (glibc keeps large freed blocks otherwise).
    """
    from PIL import Image

    from ..models.images import ALLOWED_FORMATS, safe_open_image

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            pixels = probe.size[0] * probe.size[1]
    except Exception:  # noqa: BLE001 - safe_open_image gives the proper error below
        pixels = 0
    try:
        return safe_open_image(data, max_pixels, reduce_to=reduce_to)
    finally:
        if pixels >= TRIM_PIXELS:
            release_memory()


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def image_payload(image: Any, catalog_root: Path | None) -> bytes | str | None:
    """A new row's image: bytes as given, or a path that must stay inside the catalog root."""
    if image is None or isinstance(image, (bytes, bytearray)):
        return bytes(image) if image else None
    text = str(image)
    if not text:
        return None
    if "://" in text:
        raise ValueError(f"image {text!r}: pass the image bytes for remote images")
    if catalog_root is None:
        raise ValueError(f"image path {text!r} cannot be checked: items.parquet records no catalog_root; pass bytes")
    try:
        path = resolve_inside(catalog_root, text)
    except OSError as e:
        raise ValueError(f"image {e}") from e
    if path is None:
        raise ValueError(f"image path {text!r} leaves the catalog root {catalog_root.resolve()}; pass the image bytes "
                         "instead")
    return str(path)


def load_content_pathway(store: ArtifactStore) -> Any:
    """The trained backbone's content pathway alone (VBPR's content layer and CLEAR hook), or None.

    Read from ``model/content.safetensors`` (checksum-verified against the manifest) and the
    settings in ``model/model.json``; the rest of the model and its training data are not needed.
    """
    meta = store.read_json(MODEL_JSON) if store.exists(MODEL_JSON) else {}
    settings = meta.get("content_pathway")
    if not settings:
        return None
    from safetensors.torch import load as load_tensors

    from ..models.clear_dynamic import DynamicClear
    from ..models.vbpr import ContentPathway

    data = verified_bytes(store, CONTENT_PATHWAY, stage_outputs(store, "train").get(CONTENT_PATHWAY), "train")
    if "dims" not in settings:
        raise ArtifactError(f"{MODEL_JSON} describes the content pathway in an older form (no per-modality dims); "
                            "rerun 'clearrec run --only train'")
    hook = DynamicClear.from_json(meta["clear_dynamic"]) if meta.get("clear_dynamic") else None
    pathway = ContentPathway(settings["dims"], settings["embedding_dim"], hook)
    pathway.load_state_dict(load_tensors(data))
    return pathway.eval()


def torch_from(x: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))



class RWLock:
    """Many readers or one writer (writers wait for readers to leave and block new ones)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._writer = True
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
