"""Stage ``index``: FAISS indexes over the trained item vectors and the item content (one block per modality).

- ``index/items.faiss``: the model's final item vectors, inner product, so that a user's
  top-k by ``dot(user_vector, item_vector)`` is a nearest-neighbour query. Tuned and measured
  with a sample of the model's own user vectors as queries.
- ``index/content.faiss``: per item, the content row of :class:`clearrec.models.content.ContentLayout`,
  one block per modality in the project stage's order (``concat(l2n(x_m))``, a missing vector a
  zero block) over the raw encoder features (``index.content_features = "raw"``, the default:
  search and item-to-item similarity need the meaning the modalities share, which CLEAR removes)
  or the projected ``*_clear`` features (``"projected"``). Items without a raw vector get the
  project stage's fill vector under ``encode.missing = "mean"``, as in ``*_clear``. The layout
  is written into ``index_info.json`` for serving. A full query scores the sum of the
  per-modality cosines; a query of one modality kind (text, image) fills its blocks alone.
  Tuned on every query shape at once (item content vectors, full and each block alone).

Beside each: ``index/<name>_ids.parquet`` (row -> item_idx, item_id) and one
``index/index_info.json`` (type, knob, sizes, build time, held-out recall@K vs exact, checksums).
The index type is ``index.factory`` or chosen by size and memory budget
(:func:`clearrec.models.ann.choose_factory`); the knob is tuned on one half of the query
sample and the recall is measured on the other half.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from ..models.content import ContentLayout
from ..pipeline.config.index import IndexConfig
from ..pipeline.errors import ArtifactError, ConfigError
from ..pipeline.lazy import lazy_module
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.store import ArtifactStore, arrow_to_vectors
from ..pipeline.workdir import (
    INDEX_INFO,
    ITEM_VECTORS,
    ITEMS,
    FILL,
    USER_VECTORS,
    clear_features,
    declared_modalities,
    features,
    index_file,
    index_ids,
    project_modalities,
)

faiss = lazy_module("faiss")  # imported on first use (pipeline/lazy.py)
ann = lazy_module("clearrec.models.ann")


def run(ctx: StageContext) -> StageResult:
    cfg: IndexConfig = ctx.config.index
    store = ctx.store
    rng = np.random.default_rng(cfg.seed)
    items = store.read_parquet(ITEMS, columns=["item_idx", "item_id"],
                               required={"item_idx": pa.int64(), "item_id": pa.string()})
    catalog = dict(zip(items["item_idx"].to_pylist(), items["item_id"].to_pylist()))

    idx, ids, vectors = _item_vectors(store, catalog)  # (N,), (N,), (N, d)
    users, _ = arrow_to_vectors(store.read_parquet(USER_VECTORS, columns=["vector"],
                                                   required=["user_idx", "vector"])["vector"])
    source = users if len(users) >= 2 else vectors
    queries = source[rng.choice(len(source), min(cfg.tune_queries, len(source)), replace=False)]  # (Q, d)
    tune_q, eval_q = queries[: len(queries) // 2], queries[len(queries) // 2 :]
    ctx.log(f"items index: {len(ids)} item vectors of dim {vectors.shape[1]}, {len(tune_q)} + {len(eval_q)} "
            f"{'user' if source is users else 'item'} vectors as tuning / held-out queries")
    info: dict[str, Any] = {"recall_k": cfg.recall_k, "recall_target": cfg.recall_target,
                            "items": _build(ctx, "items", idx, ids, vectors, {"user": tune_q}, {"user": eval_q})}
    info["items"]["queries"] = f"{USER_VECTORS} sample" if source is users else "item vectors sample"
    outputs = [index_file("items"), index_ids("items")]

    content = _content_vectors(store, cfg.content_features) if cfg.content else None
    if content is None:
        for name in (index_file("content"), index_ids("content")):
            if store.exists(name):
                store.path(name).unlink()
        info["content"] = None
        ctx.log("content index: skipped (" + ("index.content = false" if not cfg.content
                                               else "no features/*_clear.parquet") + ")")
    else:
        c_idx, c_ids, c_vec, layout, blocks = content
        pick = rng.choice(len(c_ids), min(cfg.tune_queries, len(c_ids)), replace=False)
        half = len(pick) // 2
        tune_sets, eval_sets = {}, {}
        for shape, q in _query_shapes(c_vec, layout).items():
            tune_sets[shape], eval_sets[shape] = q[pick[:half]], q[pick[half:]]
        ctx.log(f"content index: {len(c_ids)} items, blocks "
                + ", ".join(f"{b['modality']}[{b['dim']}]" for b in blocks))
        info["content"] = _build(ctx, "content", c_idx, c_ids, c_vec, tune_sets, eval_sets)
        info["content"].update(layout.to_json())
        info["content"]["blocks"] = blocks
        info["content"]["features"] = cfg.content_features
        info["content"]["queries"] = "item content vectors sample: every block together and each block alone"
        outputs += [index_file("content"), index_ids("content")]

    for name in ("items", "content"):
        if info.get(name) and not info[name]["tuning"]["reached"]:
            ctx.warn(f"{name} index ({info[name]['factory']}) reaches recall@{cfg.recall_k} "
                     f"{info[name]['tuning']['recall']:.3f} at best, below index.recall_target = {cfg.recall_target}; "
                     "raise index.memory_budget_mb (IVF-PQ), or set index.factory (e.g. 'Flat' for exact search, "
                     "'HNSW64')")
    store.write_json(INDEX_INFO, info)
    outputs.append(INDEX_INFO)
    parts = [f"{n} {info[n]['factory']} ({info[n]['ntotal']} rows, recall@{cfg.recall_k} {info[n]['recall']:.3f})"
             for n in ("items", "content") if info.get(n)]
    return StageResult(outputs=outputs, counts={n: info[n]["ntotal"] for n in ("items", "content") if info.get(n)},
                       summary="; ".join(parts))


def _item_vectors(store: ArtifactStore, catalog: dict[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's item vectors sorted by item_idx, checked against items.parquet."""
    table = store.read_parquet(ITEM_VECTORS, required=["item_idx", "item_id", "vector"])
    order = np.argsort(table["item_idx"].to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    idx = table["item_idx"].to_numpy().astype(np.int64)
    ids = np.array(table["item_id"].to_pylist(), dtype=object)
    vectors, valid = arrow_to_vectors(table["vector"])
    where = ITEM_VECTORS
    if not valid.all():
        raise ArtifactError(f"{where} has {int((~valid).sum())} null vectors; rerun 'clearrec run --from train'")
    if len(np.unique(idx)) != len(idx):
        raise ArtifactError(f"{where} repeats item_idx values; rerun 'clearrec run --from train'")
    wrong = [(int(i), s) for i, s in zip(idx, ids) if catalog.get(int(i)) != s]
    if wrong:
        raise ArtifactError(f"{where} does not match items.parquet (e.g. item_idx {wrong[0][0]} is "
                            f"{wrong[0][1]!r} there, {catalog.get(wrong[0][0])!r} in items.parquet); "
                            "rerun 'clearrec run --from train'")
    return idx, ids, vectors


def _content_vectors(store: ArtifactStore, which: str):
    """``(item_idx, item_id, rows (N, D), layout, blocks)`` over items with any content, or None.

    ``blocks`` is the layout's block list with what serving needs per block: how a query of
    that modality is encoded (the raw features' metadata) and whether it is then projected.
    """
    present = [m for m in project_modalities(store) if store.exists(clear_features(m))]
    if not present:
        return None
    fill = _fill_vectors(store) if which == "raw" else {}
    parts, blocks = {}, []
    for modality in present:
        name = clear_features(modality) if which == "projected" else features(modality)
        table = store.read_parquet(name, columns=["item_idx", "item_id", "vector"],
                                   required=["item_idx", "item_id", "vector"])
        x, valid = arrow_to_vectors(table["vector"])  # (N, d)
        clear_meta = store.parquet_metadata(clear_features(modality))
        raw = features(modality)  # its metadata says how a query must be encoded
        raw_meta = store.parquet_metadata(raw) if store.exists(raw) else clear_meta
        if which == "raw" and modality in fill and clear_meta.get("missing") == "mean":
            x[~valid] = fill[modality]  # as the project stage filled *_clear (its fill vector, unprojected)
            valid = np.ones_like(valid)
        parts[modality] = (table["item_idx"].to_numpy(), table["item_id"].to_pylist(), x, valid)
        clear_on = bool(clear_meta.get("clear_enabled"))  # the *_clear features were projected
        blocks.append({"modality": modality, "dim": int(x.shape[1]), "source": name,
                       "kind": _kind(modality, raw_meta), "column": raw_meta.get("column"),
                       "encoder": raw_meta.get("encoder"), "encoder_normalized": bool(raw_meta.get("normalized")),
                       "weights_sha256": raw_meta.get("weights_sha256"),
                       "text_template": raw_meta.get("text_template"), "missing": clear_meta.get("missing"),
                       "projector": clear_meta.get("projector") if clear_on else None, "clear_enabled": clear_on,
                       "projected": which == "projected" and clear_on})
    layout = ContentLayout({b["modality"]: b["dim"] for b in blocks})
    for b in blocks:
        b["start"] = layout.block(b["modality"]).start
    rows: dict[int, str] = {}
    for item_idx, item_id, _, valid in parts.values():
        rows.update({int(i): s for i, s, v in zip(item_idx, item_id, valid) if v})
    order = np.array(sorted(rows), dtype=np.int64)
    if len(order) == 0:
        return None
    dense = {}
    for modality, (item_idx, _, x, valid) in parts.items():
        dense[modality] = np.zeros((len(order), x.shape[1]), dtype=np.float32)  # (N, d), zero: no vector
        pos = np.searchsorted(order, item_idx)
        keep = valid & (pos < len(order))
        keep[keep] &= order[pos[keep]] == item_idx[keep]
        dense[modality][pos[keep]] = x[keep]
    return order, np.array([rows[int(i)] for i in order], dtype=object), layout.rows(dense), layout, blocks


def _kind(modality: str, meta: dict[str, Any]) -> str:
    """What a query of this modality is: "text", "image", or "imported" (no encoder: similar only)."""
    if meta.get("encoder") == "imported":
        return "imported"
    return meta.get("kind") or ("text" if meta.get("text_template") is not None or modality == "text" else "image")


def _fill_vectors(store: ArtifactStore) -> dict[str, np.ndarray]:
    """The project stage's fill vector per modality before projection (``clear/fill.safetensors``, ``<name>.raw``)."""
    if not store.exists(FILL):
        return {}
    tensors, _ = store.read_tensors(FILL)
    return {name.removesuffix(".raw"): v for name, v in tensors.items() if name.endswith(".raw")}


def _query_shapes(x: np.ndarray, layout: ContentLayout) -> dict[str, np.ndarray]:
    """Content queries as the API forms them: the whole vector, and each block alone (others zero)."""
    shapes = {"all": x} if len(layout.blocks) > 1 else {}
    for b in layout.blocks:
        q = np.zeros_like(x)
        q[:, b.start : b.start + b.dim] = x[:, b.start : b.start + b.dim]
        shapes[b.modality] = q
    return shapes


def _build(ctx: StageContext, name: str, item_idx: np.ndarray, item_ids: np.ndarray, x: np.ndarray,
           tune_sets: dict[str, np.ndarray], eval_sets: dict[str, np.ndarray]) -> dict[str, Any]:
    cfg: IndexConfig = ctx.config.index
    n, d = x.shape
    budget = cfg.memory_budget_mb * 2**20
    if cfg.factory == "auto":
        try:
            factory = ann.choose_factory(n, d, budget, cfg.exact_max_items, cfg.hnsw_m)
        except ValueError as e:
            raise ConfigError(f"{name} index: {e}; raise index.memory_budget_mb or set index.factory") from e
    else:
        factory = cfg.factory
    k = min(cfg.recall_k, n)
    t0 = time.perf_counter()
    try:
        index = ann.build_index(x, factory, ef_construction=cfg.ef_construction, seed=cfg.seed)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{name} index: cannot build {factory!r} over {n} vectors of dim {d}: {e}; "
                          "fix index.factory (or use 'auto')") from e
    build_s = time.perf_counter() - t0
    exact = {s: ann.exact_search(x, q, k)[1] for s, q in {**{f"t:{s}": q for s, q in tune_sets.items()},
                                                          **{f"e:{s}": q for s, q in eval_sets.items()}}.items()}
    tuning = ann.tune(index, [(q, exact[f"t:{s}"]) for s, q in tune_sets.items()], k, cfg.recall_target)
    ann.set_default(index, tuning.knob, tuning.value)
    recall_by = {s: ann.recall_at_k(ann.search(index, q, k)[1], exact[f"e:{s}"], k) for s, q in eval_sets.items()}
    ctx.log(f"{name} index: {factory} built in {build_s:.1f}s; {tuning.knob or 'no knob'}"
            + (f" = {tuning.value}" if tuning.value is not None else "")
            + f", held-out recall@{k} " + ", ".join(f"{s} {r:.3f}" for s, r in recall_by.items()))

    file, ids_file = index_file(name), index_ids(name)
    with ctx.store.atomic(file) as tmp:
        faiss.write_index(index, str(tmp))
    ids_table = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)),
                          "item_idx": pa.array(item_idx.astype(np.int64)),
                          "item_id": pa.array(list(item_ids), type=pa.string())})
    ctx.store.write_parquet(ids_file, ids_table, metadata={"index": name, "file": file})
    return {
        "file": file,
        "sha256": ctx.store.checksum(file),
        "bytes": ctx.store.path(file).stat().st_size,
        "ids_file": ids_file,
        "ids_sha256": ctx.store.checksum(ids_file),
        "factory": factory,
        "auto": cfg.factory == "auto",
        "faiss_class": ann.describe(index),
        "metric": "inner_product",
        "ntotal": int(index.ntotal),
        "dim": int(d),
        "knob": tuning.knob,
        "knob_value": tuning.value,
        "recall": min(recall_by.values()),
        "recall_by_query": recall_by,
        "recall_k": k,
        "held_out_queries": {s: len(q) for s, q in eval_sets.items()},
        "tuning": {"reached": tuning.reached, "recall": tuning.recall, "curve": tuning.curve,
                   "queries": {s: len(q) for s, q in tune_sets.items()}},
        "build_seconds": round(build_s, 3),
    }


SPEC = StageSpec(
    name="index",
    run=run,
    inputs=lambda config: (ITEMS, ITEM_VECTORS, USER_VECTORS, FILL,
                           *(f(m) for m in declared_modalities(config) for f in (features, clear_features))),
    outputs=(index_file("items"), index_ids("items"), index_file("content"), index_ids("content"), INDEX_INFO),
    config_keys=IndexConfig.build_keys(),
    code=("clearrec.models.ann", "clearrec.models.content"),
    description="FAISS indexes over the item vectors and the item content, tuned to a recall target",
)
