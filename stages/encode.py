"""Stage ``encode``: items.parquet -> features/image.parquet + features/text.parquet.

One row per item (item_idx, item_id, vector, status, error, content_sha256, truncated: the
text was cut to ``encode.max_text_chars``); an item that
cannot be encoded gets a failure status and a null vector, never a failed run. Work is cut
into shards written atomically with completion markers (resumable after a kill) and cached
by content hash + encoder (a rerun encodes only new or changed content); see
``_encode_cache``. ``encode.backend = "ray"`` runs the same shard worker in a Ray Data
actor pool. Encoder ``imported`` passes ``imported/<modality>.parquet`` through; ``none``
writes no file for that modality.
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
from ..pipeline.errors import ArtifactError, ConfigError, EncoderUnavailableError
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.store import ArtifactStore
from ..pipeline.threads import select_device, torch_threads
from ..pipeline.workdir import ITEMS, MODALITIES, features, imported
from ._encode_cache import Shard, ShardCache, assemble, encoder_key, iter_rows, shard_stem
from ._encode_shards import ShardWorker, WorkerOptions
from ._encode_sources import image_rows, text_rows

FEATURE_COLUMNS = ("item_idx", "item_id", "vector", "status", "error", "content_sha256", "truncated")
WORK_KEYS = ("encoded", "cached", "duplicates", "shards_run", "shards_reused", "shards_bad")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.encode
    if not ctx.store.exists(ITEMS):
        raise ArtifactError(f"items.parquet not found in {ctx.store.root}; run 'clearrec run --to encode' first")
    specs = {m: resolve_spec(getattr(cfg, f"{m}_encoder"), ctx.config) for m in MODALITIES}
    # in Ray mode the driver's copy only checks availability and gives identity / dim / weights hash
    device = "cpu" if cfg.backend == "ray" else select_device(cfg.device, "encode.device")
    encoded = [m for m in MODALITIES if specs[m] not in ("none", "imported")]
    fields = _template_fields(cfg.text_template, ctx.store) if "text" in encoded else []
    encoders: dict[str, Any] = {}
    for modality in encoded:  # fail before any work when an encoder cannot be had
        encoders[modality] = _load(modality, specs[modality], cfg, device, ctx.config)
        if encoders[modality].untrained:
            ctx.warn(f"the {modality} encoder {encoders[modality].identity} is UNTRAINED "
                     "(random weights): its vectors carry no meaning. Fine for a smoke run; set "
                     f"encode.{modality}_encoder to a pretrained model for real use.")
    outputs: list[str] = []
    counts: dict[str, int] = {}
    lines: list[str] = []
    with torch_threads(cfg.threads or len(os.sched_getaffinity(0))):
        for modality in MODALITIES:
            name, spec = features(modality), specs[modality]
            if spec == "none":
                ctx.store.path(name).unlink(missing_ok=True)  # a stale file must not reach downstream stages
                lines.append(f"{modality}: none")
                continue
            if spec == "imported":
                stats = _pass_through(ctx.store, modality)
            else:
                stats = _encode(ctx, modality, spec, encoders[modality], fields)
            outputs.append(name)
            counts.update({f"{modality}_{k}": v for k, v in stats.items()})
            lines.append(f"{modality}: {_describe(stats)}")
            ctx.log(lines[-1])
    return StageResult(outputs=outputs, counts=counts, summary="; ".join(lines))


def _encode(ctx: StageContext, modality: str, spec: str, encoder: Any, fields: list[str]) -> dict[str, int]:
    cfg, store = ctx.config.encode, ctx.store
    if modality == "text":
        columns = ["item_idx", "item_id", *[f for f in fields if f not in ("item_idx", "item_id")]]
        make_rows = partial(text_rows, template=cfg.text_template, fields=fields, max_chars=cfg.max_text_chars)
    else:
        root = store.parquet_metadata(ITEMS).get("catalog_root")
        if not root:
            raise ArtifactError(
                "items.parquet has no catalog_root metadata; rerun 'clearrec run --force --only ingest'"
            )
        columns = ["item_idx", "item_id", "image"]
        make_rows = partial(image_rows, catalog_root=Path(root), remote=cfg.remote_images)
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

    options = WorkerOptions(workdir=str(store.root), modality=modality, batch_size=cfg.batch_size,
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
    metadata = {"modality": modality, "encoder": encoder.identity, "dim": encoder.dim, "normalized": cfg.normalize,
                "preprocess": encoder.preprocess_desc, "untrained": encoder.untrained,
                "weights_sha256": encoder.weights_sha256}
    if modality == "text":
        metadata["text_template"] = cfg.text_template
    statuses, used = assemble(store, features(modality), cache, plan, encoder.dim, metadata)
    cache.prune(used)
    return {**statuses, **stats}


def _pass_through(store: ArtifactStore, modality: str) -> dict[str, int]:
    """Copy ``imported/<modality>.parquet`` (from the MMRec importer) to the features file, checked."""
    source = imported(modality)
    if not store.exists(source):
        raise EncoderUnavailableError(
            f"encode.{modality}_encoder = \"imported\" but {store.path(source)} does not exist; it is written by "
            f"ingest.format = \"mmrec\" when the dataset folder has {modality}_feat.npy. Choose a real encoder."
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
    metadata = {"normalized": False, "preprocess": "imported", **meta, "modality": modality,
                "encoder": "imported", "dim": dim, "untrained": False}
    store.write_parquet(features(modality), table.select(FEATURE_COLUMNS), metadata=metadata)
    statuses: dict[str, int] = {}
    for s in table.column("status").to_pylist():
        statuses[s] = statuses.get(s, 0) + 1
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
    """Weight / config files of encoders loaded from local folders (their changes rerun the stage)."""
    files: list[Path] = []
    for key in ("image_encoder", "text_encoder"):
        spec = resolve_spec(getattr(config.encode, key), config).removeprefix("clip-text:")
        folder = Path(spec.removeprefix("local-dir:"))
        if (spec.startswith("local-dir:") or folder.is_absolute()) and folder.is_dir():
            files.extend(sorted(p for p in folder.rglob("*") if p.is_file()))
    return files


def _load(modality: str, spec: str, cfg: EncodeConfig, device: str, config: Config) -> Any:
    from ..models.encoders import load_image_encoder, load_text_encoder

    try:
        if modality == "image":
            return load_image_encoder(spec, device=device, normalize=cfg.normalize, max_pixels=cfg.max_image_pixels)
        return load_text_encoder(spec, device=device, normalize=cfg.normalize)
    except EncoderUnavailableError as e:
        where = config.source or "the config file"
        raise EncoderUnavailableError(
            f"{e}. Change encode.{modality}_encoder in {where} (or pass --set encode.{modality}_encoder=...)."
        ) from e


def _template_fields(template: str, store: ArtifactStore) -> list[str]:
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise ConfigError(f"encode.text_template: {e}") from e
    columns = pq.read_schema(store.path(ITEMS)).names
    missing = [f for f in fields if f not in columns]
    if missing or not fields:
        raise ConfigError(f"encode.text_template {template!r} must use columns of items.parquet in braces; "
                          f"unknown: {missing}; available: {columns}")
    return fields


SPEC = StageSpec(
    name="encode",
    run=run,
    inputs=(ITEMS, *(imported(m) for m in MODALITIES)),
    outputs=tuple(features(m) for m in MODALITIES),
    config_keys=("encode",),
    external_inputs=local_encoder_files,
    code=("clearrec.models.encoders", "clearrec.models.images", "clearrec.models.text", "clearrec.stages._encode_cache",
          "clearrec.stages._encode_shards", "clearrec.stages._encode_sources", "clearrec.stages._encode_ray"),
    description="encode item images and text into feature vectors (features/image.parquet, features/text.parquet)",
)
