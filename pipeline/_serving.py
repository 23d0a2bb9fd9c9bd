"""Loading, checking and query encoding behind :mod:`clearrec.pipeline.api`.

- :class:`LoadedIndex`: one FAISS index deserialised from bytes whose SHA-256 was checked,
  with its row -> item_id mapping;
- :func:`verified_info`: ``index/index_info.json``, checked against the manifest;
- :class:`QueryEncoder`: the catalog's encoders, CLEAR projector, fill vectors and content
  layout, for queries and new items;
- :func:`load_content_pathway`: the trained backbone's content layer alone (VBPR), for new items;
- :class:`RWLock`: many readers or one writer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models import ann
from ..models.content import ContentLayout
from .errors import ArtifactError, EncoderUnavailableError, IntegrityError
from .store import ArtifactStore, arrow_to_vectors
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


class LoadedIndex:
    """One FAISS index, verified and loaded, with its row -> item_id mapping."""

    def __init__(self, store: ArtifactStore, entry: Mapping[str, Any]):
        self.name = Path(entry["file"]).stem
        data = verified_bytes(store, entry["file"], entry["sha256"])
        self.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        ivf = ann.ivf_part(self.index)
        if ivf is not None:
            ivf.make_direct_map()  # reconstruct(row) for similar()
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
    encoded (encoder identity, weights, template, missing policy, projector).
    """

    def __init__(self, store: ArtifactStore, layout: ContentLayout | None, blocks: dict[str, dict[str, Any]],
                 encoders: Mapping[str, Any], max_pixels: int, device: str):
        self.store, self.layout, self.blocks = store, layout, blocks
        self.max_pixels, self.device = max_pixels, device
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

    def block(self, modality: str) -> dict[str, Any]:
        if modality not in self.blocks:
            raise ArtifactError(f"the catalog has no {modality} features (encoder 'none' or no content index), "
                                f"so {modality} queries cannot be answered")
        return self.blocks[modality]

    def encoder(self, modality: str) -> Any:
        block = self.block(modality)
        with self._load_lock:
            if modality not in self._encoders:
                from ..models.encoders import load_image_encoder, load_text_encoder

                identity = block["encoder"]
                if identity in (None, "imported"):
                    raise EncoderUnavailableError(f"the catalog's {modality} features were imported without an "
                                                  f"encoder, so {modality} queries cannot be encoded")
                if modality == "text":
                    enc = load_text_encoder(identity, device=self.device, normalize=block["encoder_normalized"])
                else:
                    enc = load_image_encoder(identity, device=self.device, normalize=block["encoder_normalized"],
                                             max_pixels=self.max_pixels)
                self._encoders[modality] = self._checked(modality, enc)
            return self._encoders[modality]

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

                from ..models.clear import ClearProjector

                sha = next(b["projector"] for b in self.blocks.values() if b["clear_enabled"])
                tensors = load_tensors(verified_bytes(self.store, PROJECTOR, sha, "project"))
                self._projector = ClearProjector.from_state(tensors, self.store.read_json(PROJECTOR_JSON))
            return self._projector

    def project(self, modality: str, raw: np.ndarray) -> np.ndarray:
        """Encoder output (B, d) -> CLEAR-projected (B, d), as the catalog's *_clear features."""
        x = np.asarray(raw, dtype=np.float32)
        if not self.block(modality)["clear_enabled"]:
            return x
        proj = self.projector()
        return (proj.transform_visual if modality == "image" else proj.transform_text)(x)

    def encode(self, modality: str, payloads: list[Any]) -> np.ndarray:
        """Texts (str) or images (bytes / PIL-decodable path) -> encoder output (B, d)."""
        from ..models.images import safe_open_image

        enc = self.encoder(modality)
        batch = [safe_open_image(p, self.max_pixels) for p in payloads] if modality == "image" else payloads
        return self.run(enc.encode, batch)

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the encoder thread."""
        return self._worker.submit(fn, *args).result()

    def query(self, modality: str, payload: Any) -> np.ndarray:
        """One text / image query -> (1, D): a content row with its block alone (zeros elsewhere)."""
        self.block(modality)
        return self.layout.rows({modality: self.project(modality, self.encode(modality, [payload]))})

    def item_features(self, rows: list[dict[str, Any]], catalog_root: Path | None) -> dict[str, np.ndarray]:
        """New rows -> projected (B, d) per modality; a missing modality is filled as the catalog's was."""
        from ..models.text import apply_text_template

        out: dict[str, np.ndarray] = {}
        has_any = np.zeros(len(rows), dtype=bool)
        for modality, b in self.blocks.items():
            if modality == "text":
                template = b.get("text_template") or "{title}. {description}"
                payloads = [apply_text_template(template, r) for r in rows]
            else:
                payloads = [image_payload(r.get("image"), catalog_root) for r in rows]
            has = np.array([bool(p) for p in payloads])
            x = np.zeros((len(rows), b["dim"]), dtype=np.float32)  # (B, d)
            if has.any():
                x[has] = self.project(modality, self.encode(modality, [p for p in payloads if p]))
            if (~has).any() and b.get("missing") == "mean":
                x[~has] = self.fill(modality)
            out[modality] = x
            has_any |= has
        if not has_any.all():
            raise ValueError(f"rows {np.flatnonzero(~has_any).tolist()} have neither text nor an image to encode")
        return out

    def fill(self, modality: str) -> np.ndarray:
        """The vector the project stage gave the catalog's items without one (``clear/fill.safetensors``), (d,)."""
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
        """Projected per-modality features -> content-index rows (B, D)."""
        return self.layout.rows(features)


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
    root = catalog_root.resolve()
    path = (root / text).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {text!r} leaves the catalog root {root}; pass the image bytes instead")
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

    from ..models.clear import ClearOptions
    from ..models.clear_dynamic import DynamicClear
    from ..models.vbpr import ContentPathway

    data = verified_bytes(store, CONTENT_PATHWAY, stage_outputs(store, "train").get(CONTENT_PATHWAY), "train")
    hook = DynamicClear(ClearOptions.from_json(meta["clear_dynamic"])) if meta.get("clear_dynamic") else None
    pathway = ContentPathway(settings["text_dim"], settings["image_dim"], settings["embedding_dim"], hook)
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
