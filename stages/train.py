"""Stage ``train``: interactions + projected features -> a trained graph recommender.

Reads ``interactions.parquet`` (+ ``users`` / ``items`` for ids) and, when present,
``features/image_clear.parquet`` / ``features/text_clear.parquet``; trains the configured
backbone with BPR, early stopping on valid; writes the checkpoint, metrics, a training
curve and the user / item vectors that the index stage serves (score = dot product).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from rich.table import Table

from ..models.clear import ClearOptions
from ..pipeline.config import Config
from ..pipeline.config.train import reference_lr_decay
from ..pipeline.errors import ArtifactError, ConfigError
from ..pipeline.lazy import lazy_module
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.store import ArtifactStore, arrow_to_vectors, vectors_to_arrow
from ..pipeline.threads import ThreadGovernor, adaptive_torch_threads, select_device, torch_threads
from ..pipeline.workdir import (
    CONTENT_PATHWAY,
    GRAPH_CACHE,
    INTERACTIONS,
    ITEM_VECTORS,
    ITEMS,
    MODEL,
    MODEL_JSON,
    PROJECTOR_JSON,
    TRAINING_CURVE,
    USER_VECTORS,
    USERS,
    clear_features,
    declared_modalities,
    project_modalities,
    TRAIN_CHECKPOINT,
    read_ids,
)
from ..pipeline.workdir import METRICS as METRICS_JSON

if TYPE_CHECKING:
    from ..models.base import Backbone, ModalityHook
    from ..models.metrics import ItemSets
    from ..models.trainer import EpochRecord, TrainResult

torch = lazy_module("torch")  # imported on first use (pipeline/lazy.py); the models in the functions using them

OUTPUTS = (MODEL, MODEL_JSON, CONTENT_PATHWAY, METRICS_JSON, TRAINING_CURVE, ITEM_VECTORS, USER_VECTORS)


@dataclass
class TrainData:
    """Everything the stage reads, as tensors."""

    user_ids: list[str]  # by user_idx
    item_ids: list[str]  # by item_idx
    splits: dict[str, ItemSets]  # "train" / "valid" / "test"
    features: dict[str, torch.Tensor]  # modality -> (I, d), zero rows where an item has no vector
    feature_info: dict[str, dict[str, Any]]  # modality -> file, sha256, dim, encoder, projector, clear_enabled

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def load_data(store: ArtifactStore) -> TrainData:
    """Read users, items, interactions and the projected features present in the work directory."""
    from ..models.metrics import ItemSets

    user_ids, item_ids = read_ids(store, USERS), read_ids(store, ITEMS)
    nu, ni = len(user_ids), len(item_ids)
    t = store.read_parquet(INTERACTIONS, columns=["user_idx", "item_idx", "split"],
                           required=["user_idx", "item_idx", "split"])
    users = torch.from_numpy(np.array(t["user_idx"].to_numpy(zero_copy_only=False), dtype=np.int64))
    items = torch.from_numpy(np.array(t["item_idx"].to_numpy(zero_copy_only=False), dtype=np.int64))
    if users.numel() and (users.min() < 0 or users.max() >= nu or items.min() < 0 or items.max() >= ni):
        raise ArtifactError(
            f"interactions.parquet refers to user_idx / item_idx outside users.parquet ({nu}) / items.parquet ({ni}); "
            "rerun ingest with --force"
        )
    split = np.asarray(t["split"].to_numpy(zero_copy_only=False), dtype=object)
    splits = {}
    for name in ("train", "valid", "test"):
        sel = torch.from_numpy(split == name)
        splits[name] = ItemSets.from_pairs(users[sel], items[sel], nu, ni)
    if splits["train"].items.numel() == 0:
        raise ArtifactError("interactions.parquet has no split == 'train' rows; rerun ingest (check ingest.split)")
    if splits["valid"].items.numel() == 0:
        raise ArtifactError("interactions.parquet has no split == 'valid' rows, needed for early stopping; "
                            "check ingest.split / ingest.split_ratios")

    features, info = {}, {}
    for m in project_modalities(store):  # the project stage's modalities, in declared order
        name = clear_features(m)
        if not store.exists(name):
            continue
        ft = store.read_parquet(name, columns=["item_idx", "vector"], required=["item_idx", "vector"])
        vecs, valid = arrow_to_vectors(ft["vector"])  # (R, d), (R,)
        idx = np.asarray(ft["item_idx"].to_numpy(zero_copy_only=False), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= ni):
            raise ArtifactError(f"{name} has item_idx outside items.parquet; rerun encode / project with --force")
        dense = np.zeros((ni, vecs.shape[1]), dtype=np.float32)
        dense[idx[valid]] = vecs[valid]
        if not np.isfinite(dense).all():
            raise ArtifactError(f"{name} contains NaN or infinite values; rerun encode / project with --force")
        meta = store.parquet_metadata(name)
        features[m] = torch.from_numpy(dense)
        info[m] = {
            "file": name,
            "sha256": store.checksum(name),
            "dim": int(vecs.shape[1]),
            "items_with_vector": int(valid.sum()),
            "encoder": meta.get("encoder"),
            "projector": meta.get("projector"),
            "clear_enabled": meta.get("clear_enabled"),
        }
    return TrainData(user_ids, item_ids, splits, features, info)


def clear_settings(store: ArtifactStore) -> ClearOptions | None:
    """CLEAR's dynamic-mode settings as the project stage recorded them, or None (CLEAR off or static).

    ``clear/projector.json`` is the project stage's output: train never reads ``project.*``
    config keys, so a project setting that leaves that file unchanged never retrains.
    """
    if not store.exists(PROJECTOR_JSON):
        return None
    info = store.read_json(PROJECTOR_JSON)
    return ClearOptions.from_json(info) if info.get("mode") == "dynamic" else None


def _graph_cache_name(cls: type, info: dict[str, dict[str, Any]], knn_k: int, weights: dict[str, float]) -> str:
    """Cache file of an item-item graph, named by the feature checksums, its settings and the code building it.

    ``weights`` are the graph's resolved per-modality weights (so they name the modalities too).
    """
    from ..models import graph as graph_module

    code = inspect.getsource(graph_module) + inspect.getsource(sys.modules[cls.__module__])
    key = {
        "features": {m: info[m]["sha256"] for m in sorted(info)},
        "knn_k": knn_k,
        "modality_weights": {m: weights[m] for m in sorted(weights)},
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"{GRAPH_CACHE}/item_graph-{digest}.safetensors"


GRAPH_CACHE_KEEP = 3  # item-item graphs kept in cache/ (e.g. CLEAR on and off), the most recently used


def _prune_graph_cache(store: ArtifactStore, used: str) -> None:
    """Mark ``used`` as just used and delete all but the ``GRAPH_CACHE_KEEP`` most recently used graphs."""
    path = store.path(used)
    os.utime(path)
    graphs = sorted(path.parent.glob("item_graph-*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in graphs[GRAPH_CACHE_KEEP:]:
        if old != path:
            old.unlink(missing_ok=True)


def build_backbone(name: str, settings: dict[str, Any], data: TrainData, hook: ModalityHook | None = None,
                   item_graph: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Backbone:
    """Backbone ``name`` over ``data`` with constructor ``settings`` (as model.json records them).

    The one place a backbone is built, for training and for loading; a setting its constructor
    does not take is an error, never dropped.
    """
    from ..models.registry import backbone_class

    cls = backbone_class(name)
    accepts = inspect.signature(cls).parameters
    unknown = sorted(set(settings) - set(accepts))
    if unknown:
        raise ConfigError(f"backbone {name!r} takes no setting {', '.join(unknown)}; it takes "
                          f"{', '.join(p for p in accepts if p not in ('num_users', 'num_items'))}")
    kwargs: dict[str, Any] = {"num_users": data.num_users, "num_items": data.num_items, **settings}
    if cls.uses_graph:
        users, items = data.splits["train"].pairs(torch.arange(data.num_users))
        kwargs["edge_index"] = torch.stack([users, items])
    if cls.uses_features:  # a mapping modality name -> (I, d) features
        kwargs["features"] = dict(data.features)
    if hook is not None:
        kwargs["modality_hook"] = hook
    if item_graph is not None:
        kwargs["item_graph"] = item_graph
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"cannot build train.backbone = {name!r}: {e}") from e


def _new_model(config: Config, data: TrainData, clear: ClearOptions | None, store: ArtifactStore,
               log: Callable[[str], None]) -> tuple[Backbone, dict[str, Any]]:
    """The configured backbone, freshly initialised (seeded); plus notes for model.json."""
    from ..models.clear_dynamic import DynamicClear
    from ..models.registry import backbone_class

    cfg = config.train
    cls = backbone_class(cfg.backbone)
    accepts = inspect.signature(cls).parameters
    settings = getattr(cfg, cfg.backbone).model_dump()
    if "embedding_dim" in accepts:  # baselines such as Pop have no embeddings
        settings = {"embedding_dim": cfg.embedding_size, **settings}
    notes: dict[str, Any] = {"settings": settings, "clear_dynamic": None, "item_graph_cache": None}
    hook, item_graph = None, None
    if cls.uses_features:
        if not data.features:
            raise ConfigError(
                f"train.backbone = {cfg.backbone!r} needs item features, but no features/<name>_clear.parquet "
                "exists in the work directory; declare a modality ([encode.modalities.<name>] with an encoder, "
                "not 'none') and rerun encode and project, or set train.backbone = 'lightgcn'"
            )
        if len(data.features) == 1:
            log(f"{cfg.backbone}: one modality only ({', '.join(data.features)})")
        if clear is not None and "modality_hook" not in accepts:
            log(f"project.mode = 'dynamic' has no effect on {cfg.backbone} (it has no modality embeddings)")
        elif clear is not None:
            if len(data.features) < 2:
                raise ConfigError(f"project.mode = 'dynamic' needs at least two modalities; the work directory has "
                                  f"{list(data.features) or 'none'}: set project.mode = 'static' or encode another "
                                  "modality")
            hook = DynamicClear(clear, store.read_json(PROJECTOR_JSON).get("project"))  # per-modality on/off
            notes["clear_dynamic"] = hook.to_json()
        if "item_graph" in accepts:
            item_graph, notes["item_graph_cache"] = _item_graph(store, cfg.backbone, cls, data, settings)
    elif data.features:
        log(f"{cfg.backbone} uses no features; {', '.join(clear_features(m) for m in data.features)} ignored")
    if not cls.uses_features and clear is not None:
        log(f"project.mode = 'dynamic' has no effect on {cfg.backbone} (it has no modality embeddings)")
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, settings, data, hook, item_graph), notes


def _item_graph(store: ArtifactStore, backbone: str, cls: type, data: TrainData, settings: dict[str, Any]):
    """The frozen item-item graph from the cache (keyed by the features' checksums), built if absent."""
    from ..models.freedom import mixing_weights

    given = settings["modality_weights"]
    try:
        weights = mixing_weights(list(data.features), given)
    except ValueError as e:
        raise ConfigError(f"cannot build train.backbone = {backbone!r}: {e} (train.{backbone}.modality_weights)") from e
    name = _graph_cache_name(cls, data.feature_info, settings["knn_k"], weights)
    if store.exists(name):
        t, _ = store.read_tensors(name)
        graph = tuple(torch.from_numpy(t[k]) for k in ("rows", "cols", "values"))
    else:
        graph = cls.build_item_graph(data.features, settings["knn_k"], given)  # type: ignore[attr-defined]
        store.write_tensors(name, dict(zip(("rows", "cols", "values"), graph)))
    _prune_graph_cache(store, name)
    return graph, name


def run(ctx: StageContext) -> StageResult:
    if ctx.config.train.threads:
        with torch_threads(ctx.config.train.threads):
            return _run(ctx, None)
    with adaptive_torch_threads() as governor:  # 0: the CPUs other processes leave free, epoch by epoch
        return _run(ctx, governor)


def _run(ctx: StageContext, governor: ThreadGovernor | None) -> StageResult:
    from ..models import trainer
    from . import _train_checkpoint as checkpoint

    cfg = ctx.config.train
    store = ctx.store
    device = select_device(cfg.device, "train.device")
    data = load_data(store)
    model, notes = _new_model(ctx.config, data, clear_settings(store), store, ctx.log)
    model.to(device)
    ctx.log(
        f"train: {cfg.backbone} on {device}, {data.num_users} users x {data.num_items} items, "
        f"{data.splits['train'].items.numel()} training interactions, features: {', '.join(data.features) or 'none'}"
    )
    data.features.clear()  # the model holds what it uses: the loaded tables would be a second copy through training
    decay = cfg.lr_decay if cfg.lr_decay is not None else reference_lr_decay(cfg.backbone)
    options = trainer.TrainOptions(lr=cfg.lr, lr_decay=decay, lr_decay_epochs=cfg.lr_decay_epochs,
                                   batch_size=cfg.batch_size, epochs=cfg.epochs, patience=cfg.patience,
                                   ks=tuple(cfg.eval_ks), stop_metric=cfg.stop_metric, seed=cfg.seed,
                                   max_block=cfg.eval_block)
    notes["lr_decay"] = [decay, cfg.lr_decay_epochs]
    bar = ctx.progress(cfg.epochs, "train", unit="epoch")

    threads_used: list[int] = []  # torch threads of each epoch this process trained
    notes["threads"] = threads_used

    def on_epoch(r: EpochRecord) -> None:
        threads_used.append(torch.get_num_threads())
        if governor is not None:
            governor.update()
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}", **{cfg.stop_metric: f"{r.valid[cfg.stop_metric]:.4f}"})

    folder = store.path(TRAIN_CHECKPOINT)  # the last epoch's state: a killed run continues from it
    key = trainer.run_key(model, data.splits["train"], data.splits["valid"], options)
    try:
        result = trainer.fit(model, data.splits["train"], data.splits["valid"], data.splits["test"], options, on_epoch,
                             resume=checkpoint.load(folder, key), on_state=lambda st: checkpoint.save(folder, key, st))
    finally:
        bar.close()
    written = _write_outputs(store, ctx.config, model, data, result, notes, device)
    checkpoint.clear(folder)
    ctx.console.print(metrics_table(result, cfg.eval_ks, f"{cfg.backbone}: best epoch {result.best_epoch}"))
    s = cfg.stop_metric
    return StageResult(
        outputs=written,
        counts={"users": data.num_users, "items": data.num_items, "epochs": len(result.history),
                "best_epoch": result.best_epoch, "resumed_from_epoch": result.resumed_from},
        summary=(f"{cfg.backbone}: best epoch {result.best_epoch} of {len(result.history)}, valid {s} "
                 f"{result.valid[s]:.4f}, test recall@20 {result.test.get('recall@20', float('nan')):.4f} "
                 f"ndcg@20 {result.test.get('ndcg@20', float('nan')):.4f}"),
    )


def metrics_table(result: TrainResult, ks: tuple[int, ...], title: str) -> Table:
    """Rich table: one row per metric@K, valid and test (at the best epoch) side by side."""
    from ..models.metrics import METRICS

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("valid", justify="right")
    table.add_column("test", justify="right")
    for m in METRICS:
        for k in ks:
            name = f"{m}@{k}"
            table.add_row(name, *(f"{split[name]:.4f}" if name in split else "-" for split in (result.valid, result.test)))
    return table


def _write_outputs(store: ArtifactStore, config: Config, model: Backbone, data: TrainData,
                   result: TrainResult, notes: dict[str, Any], device: torch.device) -> list[str]:
    cfg = config.train
    user_vecs, item_vecs = (v.cpu().numpy() for v in model.vectors())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    store.write_tensors(MODEL, state, metadata={"backbone": cfg.backbone})
    pathway = model.content_pathway()
    if pathway is not None:
        store.write_tensors(CONTENT_PATHWAY, {k: v.detach().cpu().contiguous() for k, v in pathway.state_dict().items()},
                            metadata={"backbone": cfg.backbone})
    projectors = {info.get("projector") for info in data.feature_info.values()}
    store.write_json(MODEL_JSON, {
        "backbone": cfg.backbone,
        "class": type(model).__name__,
        "settings": notes["settings"],
        "hyperparameters": model.hparams(),
        "num_users": data.num_users,
        "num_items": data.num_items,
        "vector_dim": int(item_vecs.shape[1]),
        "features": data.feature_info,
        "projector": projectors.pop() if len(projectors) == 1 else sorted(p for p in projectors if p),
        "clear_dynamic": notes["clear_dynamic"],
        "content_pathway": None if pathway is None else {**pathway.settings(), "file": CONTENT_PATHWAY},
        "item_graph_cache": notes["item_graph_cache"],
        "interactions_sha256": store.checksum(INTERACTIONS),
        "training": {"lr": cfg.lr, "lr_decay": notes["lr_decay"],
                     "threads": {"setting": cfg.threads or "adaptive",
                                 "epochs_per_count": {str(n): notes["threads"].count(n)
                                                      for n in sorted(set(notes["threads"]))}},
                     "batch_size": cfg.batch_size, "max_epochs": cfg.epochs, "patience": cfg.patience,
                     "stop_metric": cfg.stop_metric, "eval_ks": list(cfg.eval_ks), "seed": cfg.seed,
                     "device": str(device), "optimizer": "adam", "negatives": "uniform, 1 per positive"},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "torch": torch.__version__,
    })
    store.write_json(METRICS_JSON, {
        "valid": result.valid,
        "test": result.test,
        "best_epoch": result.best_epoch,
        "select_metric": cfg.stop_metric,
        "epochs_run": len(result.history),
        "history": [asdict(r) for r in result.history],
    })
    _plot_curve(store, result, cfg.stop_metric, cfg.backbone)
    store.write_parquet(ITEM_VECTORS, pa.table({
        "item_idx": pa.array(np.arange(data.num_items), pa.int64()),
        "item_id": pa.array(data.item_ids, pa.string()),
        "vector": vectors_to_arrow(item_vecs),
    }), metadata={"backbone": cfg.backbone, "score": "dot", "dim": int(item_vecs.shape[1])})
    store.write_parquet(USER_VECTORS, pa.table({
        "user_idx": pa.array(np.arange(data.num_users), pa.int64()),
        "user_id": pa.array(data.user_ids, pa.string()),
        "vector": vectors_to_arrow(user_vecs),
    }), metadata={"backbone": cfg.backbone, "score": "dot", "dim": int(user_vecs.shape[1])})
    return [name for name in OUTPUTS if name != CONTENT_PATHWAY or pathway is not None]


def _plot_curve(store: ArtifactStore, result: TrainResult, stop_metric: str, backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in result.history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.loss for r in result.history], color="tab:blue")
    ax_loss.set(title=f"{backbone}: training loss", xlabel="epoch", ylabel="mean BPR loss")
    for name in sorted({stop_metric, "recall@20", "ndcg@20"} & set(result.valid or {})):
        ax_metric.plot(epochs, [r.valid[name] for r in result.history], label=f"valid {name}")
    ax_metric.axvline(result.best_epoch, color="grey", linestyle="--", label=f"best epoch {result.best_epoch}")
    ax_metric.set(title=f"{backbone}: validation (full ranking)", xlabel="epoch", ylabel="metric value")
    ax_metric.legend()
    fig.tight_layout()
    with store.atomic(TRAINING_CURVE) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def load_model(store: ArtifactStore, device: str = "cpu") -> Backbone:
    """Rebuild the trained model of a work directory from its artifacts (e.g. to score or evaluate).

    The features and interactions must be the ones it was trained on (checked by checksum). A
    model trained with CLEAR's dynamic mode gets its hook back from the settings in model.json
    and the directions saved with its weights.
    """
    from ..models.clear_dynamic import DynamicClear

    info = store.read_json(MODEL_JSON)
    data = load_data(store)
    if store.checksum(INTERACTIONS) != info["interactions_sha256"]:
        raise ArtifactError("interactions.parquet changed since the model was trained; rerun 'clearrec run --only train'")
    for m, fi in info["features"].items():
        if data.feature_info.get(m, {}).get("sha256") != fi["sha256"]:
            raise ArtifactError(f"{fi['file']} changed since the model was trained; rerun 'clearrec run --only train'")
    for m in list(data.features):
        if m not in info["features"]:
            del data.features[m], data.feature_info[m]
    hook = DynamicClear.from_json(info["clear_dynamic"]) if info.get("clear_dynamic") else None
    graph = None
    cache = info.get("item_graph_cache")
    if cache and store.exists(cache):
        t, _ = store.read_tensors(cache)
        graph = tuple(torch.from_numpy(t[k]) for k in ("rows", "cols", "values"))
    model = build_backbone(info["backbone"], info["settings"], data, hook, graph)
    tensors, _ = store.read_tensors(MODEL)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    return model.to(device).eval()


SPEC = StageSpec(
    name="train",
    run=run,
    inputs=lambda config: (USERS, ITEMS, INTERACTIONS, *(clear_features(m) for m in declared_modalities(config)),
                           PROJECTOR_JSON),
    outputs=OUTPUTS,
    config_keys=("train",),
    code=tuple(f"clearrec.models.{m}" for m in (
        "clear", "clear_dynamic", "base", "graph", "losses", "metrics", "trainer", "registry",
        "lightgcn", "vbpr", "freedom", "lattice", "mgcn", "smore", "mmgcn", "bm3", "lgmrec", "pop", "bpr", "itemknn_cbf"))
    + ("clearrec.stages._train_checkpoint",),
    description="train the graph recommender (BPR, early stopping on valid) and export user / item vectors",
)
