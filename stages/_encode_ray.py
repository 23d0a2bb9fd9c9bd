"""Ray Data backend: the local shard worker inside an actor pool, one shard per call and file.

The driver plans shards and assembles the final file exactly as in local mode; only the
shards that must run go to Ray, as a dataset of one row per shard. Each actor loads the
encoder once and writes its shards' Parquet files + completion markers itself (into the
work directory, which must be on storage every node can reach), so a rerun overwrites or
skips whole shards and never appends duplicate rows (unlike ``Dataset.write_parquet``).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import torch

from ..models.encoders import load_image_encoder, load_text_encoder
from ..pipeline.config import EncodeConfig
from ..pipeline.errors import EncoderUnavailableError
from ._encode_shards import Lookup, ShardWorker, WorkerOptions


class ShardActor:
    """One actor of the pool: a loaded encoder + a :class:`ShardWorker`."""

    def __init__(self, spec: str, weights_sha256: str, options: WorkerOptions, lookup: Lookup,
                 normalize: bool, threads: int, device: str):
        torch.set_num_threads(threads)
        if options.modality == "image":
            encoder = load_image_encoder(spec, device=device, normalize=normalize, max_pixels=options.max_pixels)
        else:
            encoder = load_text_encoder(spec, device=device, normalize=normalize)
        if encoder.weights_sha256 != weights_sha256:
            raise EncoderUnavailableError(
                f"encoder {spec!r} on this Ray node has weights {encoder.weights_sha256[:12]}..., the driver has "
                f"{weights_sha256[:12]}...; install the same weights on every node"
            )
        self.worker = ShardWorker(encoder, options, lookup)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        tasks = [json.loads(t) for t in batch["task"]]
        return {"result": [json.dumps(r) for r in self.worker.run(tasks)]}


def run_shards(tasks: list[dict[str, Any]], spec: str, weights_sha256: str, options: WorkerOptions,
               lookup: Lookup, cfg: EncodeConfig, progress: Callable[[int], None]) -> list[dict[str, Any]]:
    """Run ``tasks`` on Ray (joining ``cfg.ray_address`` or the running Ray, else starting a local one)."""
    import ray
    import ray.data

    if not tasks:
        return []
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        ds = ds.map_batches(
            ShardActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.ray_actors, len(tasks))),
            num_cpus=cfg.ray_cpus_per_actor,
            num_gpus=cfg.ray_gpus_per_actor,
            fn_constructor_kwargs={
                "spec": spec, "weights_sha256": weights_sha256, "options": options, "lookup": lookup,
                "normalize": cfg.normalize, "threads": cfg.ray_cpus_per_actor,
                "device": "cuda" if cfg.ray_gpus_per_actor > 0 else "cpu",
            },
        )
        results = []
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            progress(result["rows"])
            results.append(result)
        return results
    finally:
        if started:
            ray.shutdown()
