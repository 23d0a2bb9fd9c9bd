"""Stage ``encode``: items.parquet -> ``features/<name>.parquet`` per declared modality.

The modalities are the ``[encode.modalities.<name>]`` tables, in declared order; an image
encoder reads the items column ``column``, a text encoder the ``template`` filled from the
items' columns, ``imported`` a file of precomputed vectors (``stages/_imported.py``). One row per item (item_idx, item_id, vector, status, error, content_sha256, truncated: the
text was cut to ``encode.max_text_chars``); an item that
cannot be encoded gets a failure status and a null vector, never a failed run. Work is cut
into shards written atomically with completion markers (resumable after a kill) and cached
by content hash + encoder (a rerun encodes only new or changed content); see
``_encode_cache``. ``encode.backend = "ray"`` runs the same shard worker in a Ray Data
actor pool. Encoder ``imported`` reads its ``file`` (.npy or Parquet) or, without one, passes
``imported/<name>.parquet`` (written by the mmrec ingest) through; ``none`` writes no file for
that modality. Feature files of modalities no longer declared are removed.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models.text import template_fields
from ..pipeline.config import Config, EncodeConfig
from ..pipeline.config.encode import ModalityConfig
from ..pipeline.errors import ArtifactError, ConfigError, EncoderUnavailableError
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.store import ArtifactStore
from ..pipeline.threads import select_device, torch_threads
from ..pipeline.workdir import ITEMS, declared_modalities, features, imported, read_ids
from ._encode_cache import Shard, ShardCache, assemble, encoder_key, iter_rows, shard_stem
from ._encode_shards import ShardWorker, WorkerOptions
from ._encode_sources import image_rows, text_rows
from ._imported import feature_table, is_normalized, read_vectors

FEATURE_COLUMNS = ("item_idx", "item_id", "vector", "status", "error", "content_sha256", "truncated")
WORK_KEYS = ("encoded", "cached", "duplicates", "shards_run", "shards_reused", "shards_bad")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.encode
    if not ctx.store.exists(ITEMS):
        raise ArtifactError(f"items.parquet not found in {ctx.store.root}; run 'clearrec run --to encode' first")
    tables: dict[str, ModalityConfig] = dict(cfg.modalities)
    names = declared_modalities(ctx.config)
    specs = {m: resolve_spec(tables[m].encoder, ctx.config) for m in names}
    # in Ray mode the driver's copy only checks availability and gives identity / dim / weights hash
    device = "cpu" if cfg.backend == "ray" else select_device(cfg.device, "encode.device")
    encoded = [m for m in names if tables[m].kind in ("image", "text")]
    fields = {m: _template_fields(m, tables[m].text_template, ctx.store) for m in encoded if tables[m].kind == "text"}
    columns = pq.read_schema(ctx.store.path(ITEMS)).names
    for m in encoded:
        if tables[m].kind == "image" and tables[m].image_column not in columns:
            raise ConfigError(f"encode.modalities.{m}.column = {tables[m].image_column!r} is not a column of "
                              f"items.parquet (it has {columns})")
    encoders: dict[str, Any] = {}
    for modality in encoded:  # fail before any work when an encoder cannot be had
        encoders[modality] = _load(modality, tables[modality].kind, specs[modality], cfg, device, ctx.config)
        if encoders[modality].untrained:
            ctx.warn(f"the {modality} encoder {encoders[modality].identity} is UNTRAINED "
                     "(random weights): its vectors carry no meaning. Fine for a smoke run; set "
                     f"encode.modalities.{modality}.encoder to a pretrained model for real use.")
    _remove_undeclared(ctx.store, names)
    outputs: list[str] = []
    counts: dict[str, int] = {}
    lines: list[str] = []
    with torch_threads(cfg.threads or len(os.sched_getaffinity(0))):
        for modality in names:
            table = tables[modality]
            if table.kind == "imported" and table.file is not None:
                stats = _import_file(ctx, modality, ctx.config.resolve(table.file))
            elif table.kind == "imported":
                stats = _pass_through(ctx.store, modality)
            else:
                stats = _encode(ctx, modality, table, specs[modality], encoders[modality], fields.get(modality, []))
            outputs.append(features(modality))
            counts.update({f"{modality}_{k}": v for k, v in stats.items()})
            lines.append(f"{modality}: {_describe(stats)}")
            ctx.log(lines[-1])
    return StageResult(outputs=outputs, counts=counts, summary="; ".join(lines) or "no modality declared")


def _remove_undeclared(store: ArtifactStore, names: list[str]) -> None:
    """Delete feature files of modalities not encoded now (a stale file must not reach downstream stages)."""
    keep = {features(m) for m in names}
    folder = store.path("features")
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        name = f"features/{path.name}"
        if name not in keep and not path.stem.endswith("_clear"):
            path.unlink()


def _encode(ctx: StageContext, modality: str, table: ModalityConfig, spec: str, encoder: Any,
            fields: list[str]) -> dict[str, int]:
    cfg, store = ctx.config.encode, ctx.store
    kind = table.kind
    if kind == "text":
        columns = ["item_idx", "item_id", *[f for f in fields if f not in ("item_idx", "item_id")]]
        make_rows = partial(text_rows, template=table.text_template, fields=fields, max_chars=cfg.max_text_chars)
    else:
        root = store.parquet_metadata(ITEMS).get("catalog_root")
        if not root:
            raise ArtifactError(
                "items.parquet has no catalog_root metadata; rerun 'clearrec run --force --only ingest'"
            )
        columns = ["item_idx", "item_id", table.image_column]
        make_rows = partial(image_rows, catalog_root=Path(root), remote=cfg.remote_images, column=table.image_column)
    for tmp in store.path("features").glob(f".{modality}.parquet.*.tmp"):  # left by a killed run
        tmp.unlink()
    items = store.parquet_file(ITEMS)
    cache = ShardCache(store, modality, encoder_key(modality, encoder))
    plan = [Shard(shard_stem(lo, rows), lo, len(rows["item_idx"]))
            for lo, rows in iter_rows(items, columns, cfg.shard_size, make_rows)]
    reuse = cache.reusable(plan)
    lookup = cache.lookup(plan)

    def todo() -> Iterator[dict[str, Any]]:
        for (_, rows), shard in zip(iter_rows(items, columns, cfg.shard_size, make_rows), plan):
            if shard.stem not in reuse:
                yield {**rows, "name": shard.stem, "file": cache.file(shard.stem), "marker": cache.marker(shard.stem)}

    options = WorkerOptions(workdir=str(store.root), modality=kind, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, max_pixels=cfg.max_image_pixels,
                            http_timeout_s=cfg.http_timeout_s, http_max_bytes=cfg.http_max_bytes,
                            http_max_redirects=cfg.http_max_redirects, http_allow_private=cfg.http_allow_private)
    stats = dict.fromkeys(WORK_KEYS, 0)
    stats["shards_reused"] = len(reuse)
    stats["shards_bad"] = len(cache.bad)
    if cache.bad:
        ctx.log(f"[yellow]warning:[/] {len(cache.bad)} cached {modality} shard(s) do not match the checksum in "
                f"their marker (damaged on disk); they are not used, and those in this plan are encoded again")
    with ctx.progress(total=sum(s.rows for s in plan), desc=f"encode {modality}", unit="item") as bar:
        for shard in plan:
            if shard.stem in reuse:
                stats["cached"] += shard.rows
                bar.update(shard.rows)
        if cfg.backend == "ray":
            from ._encode_ray import run_shards

            results = run_shards(list(todo()), spec, encoder.weights_sha256, options, lookup, cfg, progress=bar.update)
        else:
            worker = ShardWorker(encoder, options, lookup, progress=bar.update)
            try:
                results = list(worker.run(todo()))
            finally:
                worker.close()
    for result in results:
        stats["shards_run"] += 1
        for k in ("encoded", "cached", "duplicates"):
            stats[k] += result[k]
    metadata = {"modality": modality, "kind": kind, "encoder": encoder.identity, "dim": encoder.dim, "normalized": cfg.normalize,
                "preprocess": encoder.preprocess_desc, "untrained": encoder.untrained,
                "weights_sha256": encoder.weights_sha256}
    if kind == "text":
        metadata["text_template"] = table.text_template
    else:
        metadata["column"] = table.image_column
    statuses, used = assemble(store, features(modality), cache, plan, encoder.dim, metadata)
    cache.prune(used)
    return {**statuses, **stats}


def _pass_through(store: ArtifactStore, modality: str) -> dict[str, int]:
    """Copy ``imported/<modality>.parquet`` (from the MMRec importer) to the features file, checked."""
    source = imported(modality)
    if not store.exists(source):
        raise EncoderUnavailableError(
            f"encode.modalities.{modality}.encoder = \"imported\" without a file, but {store.path(source)} does not "
            f"exist; it is written by ingest.format = \"mmrec\" for the modalities of ingest.features. Set "
            f"encode.modalities.{modality}.file to a .npy or Parquet file of vectors, or choose an encoder."
        )
    table = store.read_parquet(source, required=FEATURE_COLUMNS[:-1])
    if "truncated" not in table.column_names:  # imported vectors come from no text of ours
        table = table.append_column("truncated", pa.array(np.zeros(table.num_rows, dtype=bool)))
    n_items = store.parquet_file(ITEMS).metadata.num_rows
    idx = table.column("item_idx").to_numpy()
    if not np.array_equal(idx, np.arange(n_items)):
        raise ArtifactError(f"{store.path(source)} must hold one row per item, item_idx 0..{n_items - 1} in order; "
                            "rerun 'clearrec run --force --only ingest'")
    meta = store.parquet_metadata(source)
    dim = table.schema.field("vector").type.list_size
    metadata = {"normalized": False, "preprocess": "imported", **meta, "modality": modality, "kind": "imported",
                "encoder": "imported", "dim": dim, "untrained": False}
    store.write_parquet(features(modality), table.select(FEATURE_COLUMNS), metadata=metadata)
    statuses: dict[str, int] = {}
    for s in table.column("status").to_pylist():
        statuses[s] = statuses.get(s, 0) + 1
    return statuses


def _import_file(ctx: StageContext, modality: str, path: Path) -> dict[str, int]:
    """``encode.modalities.<name>.file`` -> the features file, matched to the items as _imported documents."""
    store = ctx.store
    ids = read_ids(store)
    vectors, found, where, unused = read_vectors(path, ids)
    table, statuses = feature_table(ids, vectors, found, where, path.name)
    if unused:
        ctx.log(f"{modality}: {unused:,} rows of {path} belong to no item of the catalog (unused)")
    metadata = {"modality": modality, "kind": "imported", "encoder": "imported", "dim": int(vectors.shape[1]),
                "untrained": False,
                "normalized": is_normalized(vectors, table.column("status").to_numpy(zero_copy_only=False) == "ok"),
                "preprocess": f"imported from {path.name}", "source": str(path), "weights_sha256": None}
    store.write_parquet(features(modality), table, metadata=metadata)
    return statuses


def _describe(stats: dict[str, int]) -> str:
    states = sorted((k for k in stats if k not in WORK_KEYS), key=lambda k: (k != "ok", k))
    line = ", ".join(f"{stats[k]} {k}" for k in states) or "0 items"
    work = [f"{k.replace('_', ' ')} {stats[k]}" for k in WORK_KEYS if k in stats]
    return line + (f" ({', '.join(work)})" if work else "")


def resolve_spec(spec: str, config: Config) -> str:
    """An encoder identifier with its local paths made absolute (relative to the config file)."""
    if spec.startswith("clip-text:"):
        return "clip-text:" + resolve_spec(spec[len("clip-text:"):], config)
    if spec.startswith("local-dir:"):
        return f"local-dir:{config.resolve(spec[len('local-dir:'):])}"
    if spec in ("none", "imported") or spec.startswith(("open_clip:", "open_clip-untrained:", "sentence-transformers")):
        return spec
    if spec.startswith((".", "~", "/")) or config.resolve(spec).is_dir():
        return str(config.resolve(spec))  # a sentence-transformers folder
    return spec


def local_encoder_files(config: Config) -> list[Path]:
    """Weight / config files of encoders loaded from local folders, and imported vector files (their changes
    rerun the stage)."""
    files: list[Path] = []
    for name in declared_modalities(config):
        table = config.encode.modalities[name]
        if table.kind == "imported":
            if table.file is not None:
                files.append(config.resolve(table.file))
            continue
        spec = resolve_spec(table.encoder, config).removeprefix("clip-text:")
        folder = Path(spec.removeprefix("local-dir:"))
        if (spec.startswith("local-dir:") or folder.is_absolute()) and folder.is_dir():
            files.extend(sorted(p for p in folder.rglob("*") if p.is_file()))
    return files


def _load(modality: str, kind: str, spec: str, cfg: EncodeConfig, device: str, config: Config) -> Any:
    from ..models.encoders import load_image_encoder, load_text_encoder

    try:
        if kind == "image":
            return load_image_encoder(spec, device=device, normalize=cfg.normalize, max_pixels=cfg.max_image_pixels)
        return load_text_encoder(spec, device=device, normalize=cfg.normalize)
    except EncoderUnavailableError as e:
        where = config.source or "the config file"
        raise EncoderUnavailableError(
            f"{e}. Change encode.modalities.{modality}.encoder in {where} "
            f"(or pass --set encode.modalities.{modality}.encoder=...)."
        ) from e


def _template_fields(modality: str, template: str, store: ArtifactStore) -> list[str]:
    key = f"encode.modalities.{modality}.template"
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e
    columns = pq.read_schema(store.path(ITEMS)).names
    missing = [f for f in fields if f not in columns]
    if missing or not fields:
        raise ConfigError(f"{key} {template!r} must use columns of items.parquet in braces; "
                          f"unknown: {missing}; available: {columns}")
    return fields


SPEC = StageSpec(
    name="encode",
    run=run,
    inputs=lambda config: (ITEMS, *(imported(m) for m in declared_modalities(config))),
    outputs=lambda config: tuple(features(m) for m in declared_modalities(config)),
    config_keys=("encode",),
    external_inputs=local_encoder_files,
    code=("clearrec.models.encoders", "clearrec.models.images", "clearrec.models.text", "clearrec.stages._encode_cache",
          "clearrec.stages._encode_shards", "clearrec.stages._encode_sources", "clearrec.stages._encode_ray"),
    description="encode each declared modality into feature vectors (features/<name>.parquet)",
)
