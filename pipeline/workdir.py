"""The work directory's layout: every artifact's path, named once, and the readers they share.

::

    manifest.json                          the runner's record of every stage (read with read_manifest)
    items.parquet  users.parquet           dense item_idx / user_idx -> ids (read with read_ids)
    interactions.parquet  rejects.parquet
    imported/<modality>.parquet            features imported by ingest (MMRec folders)
    features/<modality>.parquet            encoder output, one row per item
    features/<modality>_clear.parquet      the project stage's output (projected or passed through)

<modality> is each name declared in ``[encode.modalities]`` (:func:`declared_modalities`);
downstream of project, the names are those clear/projector.json lists (:func:`project_modalities`).
    clear/projector.safetensors, clear/projector.json, clear/fill.safetensors, clear/diagnostics.json
    model/model.safetensors, model/model.json, model/content.safetensors, model/metrics.json,
    model/{item,user}_vectors.parquet, model/training_curve.png
    cache/item_graph-<digest>.safetensors  derived item-item graphs, keyed by what built them
    cache/train_checkpoint/                the last epoch of an unfinished train run (resumed, then deleted)
    index/{items,content}.faiss, index/{items,content}_ids.parquet, index/index_info.json

Stages, the API and the report name artifacts only through this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ArtifactError
from .store import ArtifactStore

MANIFEST = "manifest.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
INTERACTIONS = "interactions.parquet"
REJECTS = "rejects.parquet"

PROJECTOR = "clear/projector.safetensors"
PROJECTOR_JSON = "clear/projector.json"
FILL = "clear/fill.safetensors"  # per modality, the vector the project stage gave items without one
DIAGNOSTICS = "clear/diagnostics.json"

MODEL = "model/model.safetensors"
MODEL_JSON = "model/model.json"
CONTENT_PATHWAY = "model/content.safetensors"  # what serving needs to embed new items (VBPR)
METRICS = "model/metrics.json"
TRAINING_CURVE = "model/training_curve.png"
ITEM_VECTORS = "model/item_vectors.parquet"
USER_VECTORS = "model/user_vectors.parquet"
GRAPH_CACHE = "cache"
TRAIN_CHECKPOINT = "cache/train_checkpoint"  # the last epoch's training state; deleted once train's outputs are written

INDEX_INFO = "index/index_info.json"


def declared_modalities(config: Any) -> list[str]:
    """The modalities ``config`` encodes (``[encode.modalities.<name>]``, encoder not "none"), in declared order."""
    return [name for name, m in config.encode.modalities.items() if m.encoder != "none"]


def project_modalities(store: ArtifactStore) -> list[str]:
    """The modalities the project stage wrote ``*_clear`` features for, in its order (``clear/projector.json``);
    where that file does not list them, the ``features/*_clear.parquet`` present, by name."""
    if store.exists(PROJECTOR_JSON):
        inputs = store.read_json(PROJECTOR_JSON).get("inputs")
        if isinstance(inputs, dict):
            return list(inputs)
    folder = store.path("features")
    return sorted(p.name[: -len("_clear.parquet")] for p in folder.glob("*_clear.parquet")) if folder.is_dir() else []


def imported(modality: str) -> str:
    """Features of ``modality`` imported by ingest (from an MMRec folder)."""
    return f"imported/{modality}.parquet"


def features(modality: str) -> str:
    """The encode stage's output for ``modality``."""
    return f"features/{modality}.parquet"


def clear_features(modality: str) -> str:
    """The project stage's output for ``modality`` (what train and index read)."""
    return f"features/{modality}_clear.parquet"


def index_file(name: str) -> str:
    """FAISS index ``name`` (``items`` or ``content``)."""
    return f"index/{name}.faiss"


def index_ids(name: str) -> str:
    """Row -> item_idx / item_id mapping of index ``name``."""
    return f"index/{name}_ids.parquet"


def read_manifest(store: ArtifactStore) -> dict[str, Any]:
    """``manifest.json`` as ``{"stages": {...}, ...}`` (empty stages when there is none yet).

    Raises :class:`ArtifactError` when the file exists but cannot be read.
    """
    if not store.exists(MANIFEST):
        return {"stages": {}}
    data = store.read_json(MANIFEST)
    data.setdefault("stages", {})
    return data


def stage_outputs(store: ArtifactStore, stage: str) -> dict[str, str]:
    """Output name -> SHA-256 that the runner recorded for ``stage``'s last good run (empty without one)."""
    try:
        entry = read_manifest(store)["stages"].get(stage, {})
    except ArtifactError:
        return {}
    if entry.get("status") != "ok":
        return {}
    return {name: rec["sha256"] for name, rec in entry.get("outputs", {}).items()}


def read_ids(store: ArtifactStore, name: str = ITEMS) -> list[str]:
    """Ids of ``items.parquet`` (or ``users.parquet``) in index order; the index must be dense 0..N-1."""
    idx, id_col = ("user_idx", "user_id") if name == USERS else ("item_idx", "item_id")
    t = store.read_parquet(name, columns=[idx, id_col], required=[idx, id_col])
    order = np.asarray(t[idx].to_numpy(zero_copy_only=False), dtype=np.int64)
    if order.size and (np.sort(order) != np.arange(order.size)).any():
        raise ArtifactError(f"{name}: {idx} must be dense 0..{order.size - 1}; rerun ingest with --force")
    ids = np.empty(order.size, dtype=object)
    ids[order] = t[id_col].to_pylist()
    return ids.tolist()
