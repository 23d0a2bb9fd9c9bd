"""The public Python API: ``clearrec.open(workdir)`` -> :class:`Recommender`.

::

    rec = clearrec.open("work")
    rec.recommend("u1", k=10)             # top-k by dot(user vector, item vector), seen items left out
    rec.similar("i42", k=10)              # content neighbours (or source="cf": item-vector neighbours)
    rec.search_text("red wooden toy")     # text block of the content index
    rec.search_image("photo.jpg")         # image block of the content index (path or bytes)
    rec.add_items([{"item_id": "new1", "title": "...", "image": b"..."}])

Every call returns a list of :class:`Hit` (``item_id``, ``score``, ``title``), best first.

Loading: ``index/index_info.json`` is checked against the manifest's checksum (when the
runner recorded one), and each FAISS file and id mapping is read into memory, hashed, and
deserialised only when its SHA-256 matches the one recorded at build time
(:class:`IntegrityError` otherwise), so the bytes that were checked are the bytes loaded.

Queries and the content index: content rows follow the layout recorded in ``index_info.json``
(:class:`clearrec.models.content.ContentLayout`: ``concat(l2n(image_clear), l2n(text_clear))``).
A text query goes through the catalog's own text encoder (identity from the features
metadata) and the saved CLEAR projector, is L2-normalised, and fills the text block only
(zeros in the image block), so its score is the text cosine alone; image queries mirror it.
Text is never matched against the image block: even when both encoders are one CLIP model,
CLEAR removes a different subspace from each modality (``U_k`` vs ``W_k``), so the projected
blocks no longer share CLIP's joint space, and a MiniLM text vector never did.

Seen items are every item in ``interactions.parquet`` for that user, whatever its split.
Searches run concurrently (FAISS releases the GIL); :meth:`Recommender.add_items` takes a
write lock, so a search never sees an index half-way through an insertion. Per-call
``ef_search`` / ``nprobe`` go through FAISS ``SearchParameters`` and never change the shared
index.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..models import ann
from ..models.images import DEFAULT_MAX_PIXELS
from ..models.content import ContentLayout
from ._serving import (
    LoadedIndex,
    QueryEncoder,
    RWLock,
    load_content_pathway,
    read_seen,
    read_titles,
    read_users,
    torch_from,
    verified_info,
)
from .errors import ArtifactError, ClearrecError
from .store import ArtifactStore
from .workdir import ITEMS, MODEL_JSON
from .threads import omp_threads

MAX_K = 1000


class UnknownIdError(ClearrecError, KeyError):
    """A user or item id that the work directory does not know."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Hit:
    """One result: an item, its score (inner product) and its title."""

    item_id: str
    score: float
    title: str

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": self.score, "title": self.title}


@dataclass
class AddedItems:
    """What :meth:`Recommender.add_items` did."""

    item_ids: list[str]
    content: int  # rows inserted into the content index
    cf: int  # rows inserted into the items (CF) index
    notes: list[str] = field(default_factory=list)  # why something was not inserted


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    """``"; did you mean 'U0001'?"`` when an id differs from a known one by letter case only, else ``""``."""
    folded = str(key).casefold()
    match = next((k for k in known if k.casefold() == folded), None)
    return f"; did you mean {match!r}?" if match is not None else ""


def open_workdir(workdir: str | Path, **kwargs: Any) -> "Recommender":
    """Open a work directory whose ``index`` stage has run (keyword arguments: :class:`Recommender`)."""
    return Recommender(workdir, **kwargs)


class Recommender:
    """Queries over one work directory: recommend, similar, search_text, search_image, add_items.

    Args:
        workdir: a work directory in which ``clearrec run`` has built the index.
        omp_threads: OpenMP threads of each FAISS search (1 suits single queries served
            concurrently; None keeps the calling thread's setting). Set around each search
            only: OpenMP settings are per thread, and torch shares them.
        encoders: already loaded encoders by modality (``"image"`` / ``"text"``), used instead
            of loading the identity recorded in the features metadata (which they must match).
        max_image_pixels: decompression-bomb cap for query and new-item images.
        device: torch device of the query encoders.
        text_encoder_processes: run the text query encoder in this many child processes (its
            forward passes then run outside this process's GIL, and batches of concurrent queries
            run at the same time, one per process: what a server answering other requests at the
            same time needs); the vectors are the same bytes. 0: in this process. Not for ``encoders``.
    """

    def __init__(self, workdir: str | Path, omp_threads: int | None = 1, encoders: Mapping[str, Any] | None = None,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, device: str = "cpu",
                 text_encoder_processes: int = 0):
        root = Path(workdir).expanduser()
        if not root.is_dir():
            raise ArtifactError(f"work directory {root} does not exist; run 'clearrec run' first")
        self._omp = omp_threads
        self.store = ArtifactStore(root)
        self.info = verified_info(self.store)
        self._lock = RWLock()
        self.items = LoadedIndex(self.store, self.info["items"])
        self.content = LoadedIndex(self.store, self.info["content"]) if self.info.get("content") else None
        self._blocks = {b["modality"]: b for b in self.info["content"]["blocks"]} if self.content else {}
        layout = ContentLayout.from_json(self.info["content"]) if self.content else None
        self._titles = read_titles(self.store)
        self._user_row, self._user_vectors = read_users(self.store)
        self._seen = read_seen(self.store, self.items)
        self._queries = QueryEncoder(self.store, layout, self._blocks, encoders or {}, max_image_pixels, device,
                                     text_processes=text_encoder_processes)
        self._pathway, self._pathway_lock = None, threading.Lock()

    # ---- queries ---------------------------------------------------------------------
    def recommend(self, user_id: str, k: int = 20, exclude_seen: bool = True,
                  ef_search: int | None = None, nprobe: int | None = None) -> list[Hit]:
        """Top-``k`` items for ``user_id`` by ``dot(user_vector, item_vector)``."""
        _check_k(k)
        row = self._user_row.get(str(user_id))
        if row is None:
            raise UnknownIdError(f"unknown user {user_id!r}: not in model/user_vectors.parquet "
                                 f"(users need at least one training interaction){_suggest(user_id, self._user_row)}")
        seen = self._seen.get(row, _EMPTY) if exclude_seen else _EMPTY
        q = self._user_vectors[row : row + 1]  # (1, d)
        with self._lock.read():
            return self._hits(self.items, q, k, set(seen.tolist()), ef_search, nprobe)

    def similar(self, item_id: str, k: int = 20, source: str = "content",
                ef_search: int | None = None, nprobe: int | None = None) -> list[Hit]:
        """Items nearest to ``item_id``: by content (default) or by item vectors (``source="cf"``)."""
        _check_k(k)
        if source not in ("content", "cf"):
            raise ValueError(f"source must be 'content' or 'cf', got {source!r}")
        with self._lock.read():
            index = self.items if source == "cf" else self.content
            if index is None:
                raise ArtifactError("this work directory has no content index (index.content = false or no "
                                    "features); use similar(..., source='cf')")
            row = index.row_of.get(str(item_id))
            if row is None:
                known = str(item_id) in self._titles or str(item_id) in self.items.row_of
                raise UnknownIdError(f"item {item_id!r} has no content vector" if known else
                                     f"unknown item {item_id!r}: not in the {index.name} index"
                                     f"{_suggest(item_id, index.row_of)}")
            q = index.index.reconstruct(row)[None, :]  # (1, d)
            return self._hits(index, q, k, {row}, ef_search, nprobe)

    def search_text(self, text: str, k: int = 20, ef_search: int | None = None,
                    nprobe: int | None = None) -> list[Hit]:
        """Items whose projected text is nearest to ``text`` (text block of the content index)."""
        _check_k(k)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("search_text needs a non-empty string")
        self._require_content()
        q = self._queries.query("text", text)  # (1, D)
        with self._lock.read():
            return self._hits(self.content, q, k, set(), ef_search, nprobe)

    def search_image(self, image: str | Path | bytes, k: int = 20, ef_search: int | None = None,
                     nprobe: int | None = None) -> list[Hit]:
        """Items whose projected image is nearest to ``image`` (a file path or the file's bytes)."""
        _check_k(k)
        data = image if isinstance(image, (bytes, bytearray)) else _read_file(Path(image))
        self._require_content()
        q = self._queries.query("image", bytes(data))  # (1, D)
        with self._lock.read():
            return self._hits(self.content, q, k, set(), ef_search, nprobe)

    # ---- new items -------------------------------------------------------------------
    def add_items(self, rows: Iterable[Mapping[str, Any]]) -> AddedItems:
        """Encode, project and insert new catalog rows (cold start); see the module docstring.

        Each row has ``item_id`` (new), ``title``, optional ``description`` and optional
        ``image`` (bytes, or a path inside the catalog root). Rows go into the content index;
        into the CF index only where the trained backbone has a content pathway.
        """
        rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in dict(r).items()}  # NaN -> None
                for r in (rows.to_dict("records") if hasattr(rows, "to_dict") else rows)]
        ids = [str(r.get("item_id") or "") for r in rows]
        self._check_new(ids)
        if self.content is None:
            raise ArtifactError("no content index in this work directory (index.content = false or no "
                                "features); new items cannot be encoded")
        blocks, features = self._queries.item_features(rows, self._catalog_root())  # modality -> (B, d) each
        content = self._queries.content(blocks)  # (B, D)
        cf, notes = self._cf_vectors(features)
        with self._lock.write():
            self._check_new(ids)  # again: another add_items may have taken an id meanwhile
            self.content.add(content, ids)
            if cf is not None:
                self.items.add(cf, ids)
            self._titles.update({i: str(r.get("title") or "") for i, r in zip(ids, rows)})
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return AddedItems(ids, len(ids), 0 if cf is None else len(ids), notes)

    def _check_new(self, ids: list[str]) -> None:
        bad = [i for i in ids if not i or i in self._titles or i in self.items.row_of]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"add_items needs new, distinct, non-empty item_id values; offending: "
                             f"{bad or sorted({i for i in ids if ids.count(i) > 1})}")

    # ---- introspection ---------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return self.items.index.ntotal

    @property
    def num_users(self) -> int:
        return len(self._user_row)

    def health(self) -> dict[str, Any]:
        """Sizes and index types, for ``GET /health``."""
        out = {"items": self.num_items, "users": self.num_users,
               "items_index": {k: self.info["items"][k] for k in ("factory", "knob", "knob_value", "recall")}}
        if self.content is not None:
            out["content_index"] = {k: self.info["content"][k] for k in ("factory", "knob", "knob_value", "recall")}
            out["content_index"]["rows"] = self.content.index.ntotal
        return out

    def close(self) -> None:
        """Stop the query encoders' thread and processes (a server calls it at shutdown)."""
        self._queries.close()

    def warm_up(self) -> None:
        """Load the query encoders now instead of on the first text / image query."""
        for modality in self._blocks:
            self._queries.encoder(modality)

    # ---- internals -------------------------------------------------------------------
    def _catalog_root(self) -> Path | None:
        root = self.store.parquet_metadata(ITEMS).get("catalog_root")
        return Path(root) if root else None

    def _cf_vectors(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray | None, list[str]]:
        """Item vectors of new items through the backbone's content pathway, or None and why not."""
        pathway = self._content_pathway()
        if pathway is None:
            backbone = self.store.read_json(MODEL_JSON).get("backbone", "unknown") if self.store.exists(MODEL_JSON) \
                else "unknown"
            return None, [f"backbone {backbone!r} has no content pathway: the new items are in the content index "
                          "(similar, search_text, search_image) but not in recommend() until the model is retrained"]
        x = {m: torch_from(features[m]) for m in features}
        vectors = self._queries.run(pathway.item_vectors, {m: x[m] for m in pathway.modalities if m in x})  # (B, 2d)
        return vectors.numpy(), []

    def _content_pathway(self) -> Any:
        """The trained backbone's content layer alone (loaded once, checked against the manifest), or None."""
        with self._pathway_lock:
            if self._pathway is None:
                self._pathway = load_content_pathway(self.store) or False
            return self._pathway or None

    def _require_content(self) -> None:
        if self.content is None:
            raise ArtifactError("this work directory has no content index; text / image search needs "
                                "index.content = true and features from the encode stage")

    def _hits(self, index: "LoadedIndex", q: np.ndarray, k: int, exclude: set[int],
              ef_search: int | None, nprobe: int | None) -> list[Hit]:
        params = ann.search_parameters(index.index, ef_search, nprobe)
        fetch = min(k + len(exclude), index.index.ntotal)
        with omp_threads(self._omp):
            scores, rows = ann.search(index.index, q, fetch, params)
        out = []
        for s, r in zip(scores[0].tolist(), rows[0].tolist()):
            if r < 0 or r in exclude:
                continue
            item_id = index.item_ids[r]
            out.append(Hit(item_id, float(s), self._titles.get(item_id, "")))
            if len(out) == k:
                break
        return out


def _read_file(path: Path) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in 1..{MAX_K}, got {k!r}")


_EMPTY = np.zeros(0, dtype=np.int64)
