"""The ingest stage: raw catalog files -> items / users / interactions / rejects (Parquet).

Reads one of three layouts (``[ingest] format``: table, mmrec, split-json; see
``_ingest_formats``), validates every row (``_ingest_clean``), applies the iterated k-core
filter, splits the interactions into train / valid / test (per user, or at global cut-off
times), and writes

- ``items.parquet``: item_idx (dense), item_id, title, description, text, image, extra raw columns;
- ``users.parquet``: user_idx (dense), user_id;
- ``interactions.parquet``: user_idx, item_idx, timestamp, rating, split;
- ``rejects.parquet``: source, row, reason for every row not used;
- ``imported/<name>.parquet``: MMRec feature files (``ingest.features``), in the encode stage's schema.

Counts are conserved per file: records read = accepted + rejected (in the manifest).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from ..pipeline.config import IngestConfig
from ..pipeline.errors import InputDataError
from ..pipeline.lazy import lazy_module
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.workdir import INTERACTIONS, ITEMS, REJECTS, USERS, imported
from ._ingest_clean import (SPLITS, TIMED_SPLITS, arrow_strings, assign_split, clean_interactions, clean_items,
                            filter_core, global_temporal_split, index_in, isin, stable_argsort)
from ._ingest_formats import MMREC_COLUMNS, Catalog, external_inputs, load_catalog
from ._imported import feature_table, is_normalized
from ._ingest_readers import Rejects

pd = lazy_module("pandas")  # imported on first use (pipeline/lazy.py)
pc = lazy_module("pyarrow.compute")

OUTPUTS = (ITEMS, USERS, INTERACTIONS, REJECTS)


def run(ctx: StageContext) -> StageResult:
    """Ingest; the Parquet files are written by a background thread while the rest goes on (Arrow
    releases the GIL while it encodes), and all of them are on disk before this returns or raises."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-write") as pool:
        pending: list[Future] = []

        def write(name: str, table: pa.Table | Rejects, **kwargs) -> None:
            if isinstance(table, Rejects):
                pending.append(pool.submit(ctx.store.write_parquet_batches, name, Rejects.SCHEMA, table.batches()))
            else:
                pending.append(pool.submit(ctx.store.write_parquet, name, table, **kwargs))

        result = _ingest(ctx, write)
        for done in pending:
            done.result()  # a failed write fails the stage
    return result


def _ingest(ctx: StageContext, write: Callable[..., None]) -> StageResult:
    config = ctx.config
    cfg = config.ingest
    rejects = Rejects()
    catalog = load_catalog(config, rejects, ctx.log)
    _check_policy(cfg, catalog)
    root = config.resolve(cfg.catalog_root)
    items, rejected_items = clean_items(catalog.items, rejects, root)
    inter = clean_interactions(catalog.hand_over_interactions(), items, rejected_items, rejects,
                               split_policy=cfg.split, min_rating=cfg.min_rating)
    inter, items = filter_core(inter, items, rejects, k=cfg.kcore, need_train=cfg.split == "given")
    cutoffs: dict[str, int] = {}
    if cfg.split == "global-temporal" and not inter.empty:
        code, cutoffs = global_temporal_split(inter["ts"].to_numpy(), cfg.split_ratios)
        inter, items = filter_core(inter.assign(split=code), items, rejects, k=0, need_train=True)
    items = items.reset_index(drop=True)
    write(REJECTS, rejects)
    by_code = rejects.by_code()
    if inter.empty or items.empty:
        raise InputDataError(
            f"no {'interactions' if inter.empty else 'items'} left from {catalog.source}: "
            f"{len(rejects)} rows rejected ({_reasons(by_code)}); see {ctx.store.path('rejects.parquet')} for "
            "each row and its reason, fix the input or the [ingest] settings, then run again"
        )

    users = pd.Index(pd.unique(inter["user_id"]))  # order of first appearance
    if catalog.user_order is not None:
        given = pd.Index(catalog.user_order)
        users = given[isin(given, users)]
    user_idx = index_in(inter["user_id"], users)
    item_idx = index_in(inter["item_id"], items["item_id"])
    ts = inter["ts"].to_numpy()
    split = inter["split"].to_numpy() if cfg.split in ("given", "global-temporal") else assign_split(
        user_idx, ts, cfg.split, cfg.split_ratios, cfg.seed)
    order = stable_argsort(user_idx)

    counts = _counts(catalog, items, inter, rejects, n_users=len(users), split=split)
    counts["reject_reasons"] = by_code
    if cutoffs:
        counts["split_cutoffs"] = cutoffs
    write(ITEMS, _items_table(items), metadata={
        "catalog_root": str(root), "source": catalog.source, "format": cfg.format})
    write(USERS, pa.table({
        "user_idx": pa.array(np.arange(len(users)), pa.int64()),
        "user_id": pa.array(users.astype(str).tolist(), pa.string())}))
    rating = inter["rating"].to_numpy()
    write(INTERACTIONS, pa.table({
        "user_idx": pa.array(user_idx[order], pa.int64()),
        "item_idx": pa.array(item_idx[order], pa.int64()),
        "timestamp": pa.array(np.nan_to_num(ts[order]).astype(np.int64), pa.int64(), mask=np.isnan(ts[order])),
        "rating": pa.array(rating[order], pa.float64(), mask=np.isnan(rating[order])),
        "split": pc.cast(pa.DictionaryArray.from_arrays(pa.array(split[order], pa.int8()), pa.array(SPLITS)),
                         pa.string())}))
    outputs = list(OUTPUTS)
    for old in sorted(ctx.store.path("imported").glob("*.parquet")) if ctx.store.path("imported").is_dir() else []:
        if old.stem not in catalog.features:
            old.unlink()  # a stale import must not stand in for encode
    for modality, path in catalog.features.items():
        name = imported(modality)
        _write_imported(ctx, name, modality, path, items)
        outputs.append(name)

    ctx.log(f"items: {counts['items_read']:,} read = {counts['items_accepted']:,} accepted "
            f"+ {counts['items_rejected']:,} rejected")
    ctx.log(f"interactions: {counts['interactions_read']:,} read = {counts['interactions_accepted']:,} accepted "
            f"+ {counts['interactions_rejected']:,} rejected")
    if len(rejects):
        ctx.log(f"rejected rows by reason: {_reasons(by_code)} (see rejects.parquet)")
    if cutoffs:
        ctx.log("global-temporal split: " + ", ".join(
            f"{name.replace('_', ' ')} {pd.Timestamp(t, unit='s', tz='UTC'):%Y-%m-%d %H:%M:%S} UTC (unix {t})"
            for name, t in cutoffs.items()))
    summary = (f"{len(items):,} items, {len(users):,} users, {len(inter):,} interactions "
               f"(train {counts['train']:,} / valid {counts['valid']:,} / test {counts['test']:,}), "
               f"{len(rejects):,} rows rejected")
    return StageResult(outputs=outputs, counts=counts, summary=summary)


def _check_policy(cfg: IngestConfig, catalog: Catalog) -> None:
    """split = "given" needs a split column, the time-ordered splits a timestamp column."""
    need = "timestamp" if cfg.split in TIMED_SPLITS else {"given": "split"}.get(cfg.split)
    if need is None or need in catalog.present:
        return
    files = ", ".join(k.split(": ", 1)[1] for k in catalog.read if k.startswith("interactions: "))
    if cfg.format == "table":
        fix = (f"looked for {getattr(cfg.columns, need)!r}, set by ingest.columns.{need}; add the column, map it, "
               "or use split = 'random'")
    elif cfg.format == "mmrec":
        fix = f"the MMRec column is {MMREC_COLUMNS[need]!r}; add it or use split = 'random'"
    else:
        fix = "split-json files carry no timestamps; use split = 'given' or 'random'"
    raise InputDataError(f"split = {cfg.split!r} needs a {need} column, and {files} has none ({fix})")


def _reasons(by_code: dict[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in by_code.items())


def _counts(catalog: Catalog, items: pd.DataFrame, inter: pd.DataFrame, rejects: Rejects, *, n_users: int,
            split: np.ndarray) -> dict:
    """Records read / accepted / rejected per file and in total; raises if any file's counts do not add up."""
    accepted = {"items": items["_src"].value_counts().to_dict(), "interactions": inter["_src"].value_counts().to_dict()}
    sources, totals = {}, {}
    for key, n_read in catalog.read.items():
        kind, source = key.split(": ", 1)
        acc, rej = int(accepted[kind].get(source, 0)), rejects.count(kind, source)
        if acc + rej != n_read:
            raise RuntimeError(f"ingest lost rows of {source}: read {n_read}, accepted {acc}, rejected {rej}")
        sources[key] = {"read": n_read, "accepted": acc, "rejected": rej}
        for part, n in (("read", n_read), ("accepted", acc), ("rejected", rej)):
            totals[f"{kind}_{part}"] = totals.get(f"{kind}_{part}", 0) + n
    per_split = np.bincount(split, minlength=3)
    return {**totals, "users": n_users, **{s: int(per_split[j]) for j, s in enumerate(SPLITS)}, "sources": sources}


def _items_table(items: pd.DataFrame) -> pa.Table:
    columns = {"item_idx": pa.array(np.arange(len(items)), pa.int64())}
    for col in items.columns:
        if not col.startswith("_"):
            columns[col] = pc.cast(arrow_strings(items[col]), pa.string())
    order = ["item_idx", "item_id", "title", "description", "text", "image"]
    return pa.table({c: columns[c] for c in order + [c for c in columns if c not in order]})


def _write_imported(ctx: StageContext, name: str, modality: str, path: Path, items: pd.DataFrame) -> None:
    """An MMRec feature file's rows (by itemID) -> the encode stage's feature-file schema."""
    feats = np.load(path, mmap_mode="r", allow_pickle=False)
    rows = items["_feature_row"].to_numpy(np.int64)
    vectors = np.asarray(feats[rows], dtype=np.float32)  # (N, d)
    table, statuses = feature_table(items["item_id"].tolist(), vectors, np.ones(len(rows), dtype=bool),
                                    [f"row {r}" for r in rows], path.name)
    ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
    ctx.store.write_parquet(name, table.drop_columns(["truncated"]), metadata={
        "modality": modality, "encoder": "imported", "dim": int(vectors.shape[1]),
        "normalized": is_normalized(vectors, ok), "preprocess": f"MMRec {path.name}", "untrained": False,
        "source": str(path)})
    bad = ", ".join(f"{n} {s}" for s, n in statuses.items() if s != "ok")
    ctx.log(f"imported {modality} features: {int(ok.sum()):,} of {len(items):,} items from {path}"
            + (f" ({bad})" if bad else ""))


SPEC = StageSpec(
    name="ingest",
    run=run,
    outputs=lambda config: OUTPUTS + tuple(imported(m) for m in config.ingest.features),
    config_keys=("ingest",),
    external_inputs=external_inputs,
    code=("clearrec.stages._ingest_readers", "clearrec.stages._ingest_formats", "clearrec.stages._ingest_clean",
          "clearrec.models.text"),
    description="raw items + interactions -> items / users / interactions (split) / rejects",
)
