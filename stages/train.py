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
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rich.table import Table

from ..models import checkpoint
from ..models import graph as graph_module
from ..models.base import ModalityHook, Recommender
from ..models.metrics import METRICS, ItemSets
from ..models.registry import backbone_class
from ..models.trainer import EpochRecord, TrainOptions, TrainResult, fit
from ..pipeline.config import Config
from ..pipeline.errors import ArtifactError, ConfigError
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.store import ArtifactStore, arrow_to_vectors, vectors_to_arrow
from ..pipeline.threads import torch_threads

MODALITIES = ("image", "text")
FEATURE_FILES = {m: f"features/{m}_clear.parquet" for m in MODALITIES}
CHECKPOINT_DIR = "cache/train_checkpoint"  # the last epoch's training state; deleted once the outputs are written
OUTPUTS = (
    "model/model.safetensors",
    "model/model.json",
    "model/metrics.json",
    "model/training_curve.png",
    "model/item_vectors.parquet",
    "model/user_vectors.parquet",
)


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


def _ids(store: ArtifactStore, name: str, idx: str, id_col: str) -> list[str]:
    t = store.read_parquet(name, columns=[idx, id_col], required=[idx, id_col])
    order = np.asarray(t[idx].to_numpy(zero_copy_only=False), dtype=np.int64)
    if order.size and (np.sort(order) != np.arange(order.size)).any():
        raise ArtifactError(f"{name}: {idx} must be dense 0..{order.size - 1}; rerun ingest with --force")
    ids = np.empty(order.size, dtype=object)
    ids[order] = t[id_col].to_pylist()
    return ids.tolist()


def load_data(store: ArtifactStore) -> TrainData:
    """Read users, items, interactions and the projected features present in the work directory."""
    user_ids = _ids(store, "users.parquet", "user_idx", "user_id")
    item_ids = _ids(store, "items.parquet", "item_idx", "item_id")
    nu, ni = len(user_ids), len(item_ids)
    t = store.read_parquet("interactions.parquet", columns=["user_idx", "item_idx", "split"],
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
    for m, name in FEATURE_FILES.items():
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


DYNAMIC_KEYS = ("k", "ratio", "strength", "center", "project_centered", "visual", "text", "directions", "seed")


def _dynamic_hook(config: Config) -> ModalityHook | None:
    """CLEAR's dynamic mode: a :class:`DynamicClear` the backbone refits once per epoch.

    The shared directions are recomputed on the backbone's encoded modality embeddings at the
    start of every epoch (SVD without gradient) and project them in every step of that epoch;
    they are saved with the model, so serving projects new items with the same directions.
    """
    if not (config.get("project.enabled") and config.get("project.mode") == "dynamic"):
        return None
    return _dynamic_clear({key: config.get(f"project.{key}") for key in DYNAMIC_KEYS})


def _dynamic_clear(settings: dict[str, Any]) -> ModalityHook:
    """A :class:`DynamicClear` from the ``project.*`` settings (as recorded in model.json)."""
    from ..models.clear_dynamic import DynamicClear

    opts = {key: settings[key] for key in DYNAMIC_KEYS}
    if opts["ratio"] is not None:
        opts["k"] = None  # the energy ratio chooses k
    return DynamicClear(**opts)


def _graph_cache_name(cls: type, info: dict[str, dict[str, Any]], knn_k: int, image_weight: float) -> str:
    """Cache file of an item-item graph, named by the feature checksums, its settings and the code building it."""
    code = inspect.getsource(graph_module) + inspect.getsource(sys.modules[cls.__module__])
    key = {
        "features": {m: info[m]["sha256"] for m in sorted(info)},
        "knn_k": knn_k,
        "image_weight": image_weight if len(info) == 2 else None,
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"cache/item_graph-{digest}.safetensors"


GRAPH_CACHE_KEEP = 3  # item-item graphs kept in cache/ (e.g. CLEAR on and off), the most recently used


def _prune_graph_cache(store: ArtifactStore, used: str) -> None:
    """Mark ``used`` as just used and delete all but the ``GRAPH_CACHE_KEEP`` most recently used graphs."""
    path = store.path(used)
    os.utime(path)
    graphs = sorted(path.parent.glob("item_graph-*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in graphs[GRAPH_CACHE_KEEP:]:
        if old != path:
            old.unlink(missing_ok=True)


def build_model(
    config: Config, data: TrainData, store: ArtifactStore | None = None, log: Callable[[str], None] = print
) -> tuple[Recommender, dict[str, Any]]:
    """The configured backbone, freshly initialised (seeded), on CPU; plus notes for model.json."""
    cfg = config.train
    cls = backbone_class(cfg.backbone)
    params = getattr(cfg, cfg.backbone).model_dump()
    kwargs: dict[str, Any] = {"num_users": data.num_users, "num_items": data.num_items,
                              "embedding_dim": cfg.embedding_size, **params}
    notes: dict[str, Any] = {"clear_dynamic": None, "item_graph_cache": None}
    accepts = inspect.signature(cls).parameters
    if cls.uses_graph:
        train = data.splits["train"]
        users, items = train.pairs(torch.arange(data.num_users))
        kwargs["edge_index"] = torch.stack([users, items])
    if cls.uses_features:
        if not data.features:
            raise ConfigError(
                f"train.backbone = {cfg.backbone!r} needs image or text features, but neither "
                f"{FEATURE_FILES['image']} nor {FEATURE_FILES['text']} exists in the work directory; set "
                "encode.image_encoder or encode.text_encoder to an encoder (not 'none') and rerun encode and project, "
                "or set train.backbone = 'lightgcn'"
            )
        for m in MODALITIES:
            if m not in data.features:
                log(f"{cfg.backbone}: no {m} features ({FEATURE_FILES[m]} absent); using the "
                    f"{' and '.join(data.features)} modality only")
        kwargs["image_features"] = data.features.get("image")
        kwargs["text_features"] = data.features.get("text")
        hook = _dynamic_hook(config)
        if hook is not None:
            if len(data.features) < 2:
                raise ConfigError("project.mode = 'dynamic' needs both image and text features; "
                                  "set project.mode = 'static' or provide both modalities")
            kwargs["modality_hook"] = hook
            notes["clear_dynamic"] = {key: config.get(f"project.{key}") for key in DYNAMIC_KEYS}
        if "item_graph" in accepts and store is not None:
            name = _graph_cache_name(cls, data.feature_info, params["knn_k"], params["image_weight"])
            notes["item_graph_cache"] = name
            if store.exists(name):
                t, _ = store.read_tensors(name)
                kwargs["item_graph"] = tuple(torch.from_numpy(t[k]) for k in ("rows", "cols", "values"))
            else:
                g = cls.build_item_graph(kwargs["image_features"], kwargs["text_features"],  # type: ignore[attr-defined]
                                         params["knn_k"], params["image_weight"])
                store.write_tensors(name, dict(zip(("rows", "cols", "values"), g)))
                kwargs["item_graph"] = g
            _prune_graph_cache(store, name)
    elif data.features:
        log(f"{cfg.backbone} uses no features; {', '.join(FEATURE_FILES[m] for m in data.features)} ignored")
    if not cls.uses_features and config.get("project.enabled") and config.get("project.mode") == "dynamic":
        log(f"project.mode = 'dynamic' has no effect on {cfg.backbone} (it has no modality embeddings)")
    kwargs = {k: v for k, v in kwargs.items() if k in accepts}
    torch.manual_seed(cfg.seed)
    try:
        model = cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"cannot build train.backbone = {cfg.backbone!r}: {e}") from e
    return model, notes


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available; set train.device = 'cpu' or 'auto'")
    return torch.device(name)


def run(ctx: StageContext) -> StageResult:
    with torch_threads(ctx.config.train.threads):  # 0: leave torch's setting as it is
        return _run(ctx)


def _run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.train
    store = ctx.store
    device = _device(cfg.device)
    data = load_data(store)
    model, notes = build_model(ctx.config, data, store, ctx.log)
    model.to(device)
    ctx.log(
        f"train: {cfg.backbone} on {device}, {data.num_users} users x {data.num_items} items, "
        f"{data.splits['train'].items.numel()} training interactions, features: {', '.join(data.features) or 'none'}"
    )
    options = TrainOptions(lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, patience=cfg.patience,
                           ks=tuple(cfg.eval_ks), stop_metric=cfg.stop_metric, seed=cfg.seed, max_block=cfg.eval_block)
    bar = ctx.progress(cfg.epochs, "train", unit="epoch")

    def on_epoch(r: EpochRecord) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}", **{cfg.stop_metric: f"{r.valid[cfg.stop_metric]:.4f}"})

    try:
        result = fit(model, data.splits["train"], data.splits["valid"], data.splits["test"], options, on_epoch,
                     checkpoint_dir=store.path(CHECKPOINT_DIR))
    finally:
        bar.close()
    written = _write_outputs(store, ctx.config, model, data, result, notes, device)
    checkpoint.clear(store.path(CHECKPOINT_DIR))
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
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("valid", justify="right")
    table.add_column("test", justify="right")
    for m in METRICS:
        for k in ks:
            name = f"{m}@{k}"
            table.add_row(name, *(f"{split[name]:.4f}" if name in split else "-" for split in (result.valid, result.test)))
    return table


def _write_outputs(store: ArtifactStore, config: Config, model: Recommender, data: TrainData,
                   result: TrainResult, notes: dict[str, Any], device: torch.device) -> list[str]:
    cfg = config.train
    user_vecs, item_vecs = (v.cpu().numpy() for v in model.vectors())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    store.write_tensors("model/model.safetensors", state, metadata={"backbone": cfg.backbone})
    projectors = {info.get("projector") for info in data.feature_info.values()}
    store.write_json("model/model.json", {
        "backbone": cfg.backbone,
        "class": type(model).__name__,
        "hyperparameters": model.hparams(),
        "num_users": data.num_users,
        "num_items": data.num_items,
        "vector_dim": int(item_vecs.shape[1]),
        "features": data.feature_info,
        "projector": projectors.pop() if len(projectors) == 1 else sorted(p for p in projectors if p),
        "clear_dynamic": notes["clear_dynamic"],
        "item_graph_cache": notes["item_graph_cache"],
        "interactions_sha256": store.checksum("interactions.parquet"),
        "training": {"lr": cfg.lr, "batch_size": cfg.batch_size, "max_epochs": cfg.epochs, "patience": cfg.patience,
                     "stop_metric": cfg.stop_metric, "eval_ks": list(cfg.eval_ks), "seed": cfg.seed,
                     "device": str(device), "optimizer": "adam", "negatives": "uniform, 1 per positive"},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "torch": torch.__version__,
    })
    store.write_json("model/metrics.json", {
        "valid": result.valid,
        "test": result.test,
        "best_epoch": result.best_epoch,
        "select_metric": cfg.stop_metric,
        "epochs_run": len(result.history),
        "history": [asdict(r) for r in result.history],
    })
    _plot_curve(store, result, cfg.stop_metric, cfg.backbone)
    store.write_parquet("model/item_vectors.parquet", pa.table({
        "item_idx": pa.array(np.arange(data.num_items), pa.int64()),
        "item_id": pa.array(data.item_ids, pa.string()),
        "vector": vectors_to_arrow(item_vecs),
    }), metadata={"backbone": cfg.backbone, "score": "dot", "dim": int(item_vecs.shape[1])})
    store.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": pa.array(np.arange(data.num_users), pa.int64()),
        "user_id": pa.array(data.user_ids, pa.string()),
        "vector": vectors_to_arrow(user_vecs),
    }), metadata={"backbone": cfg.backbone, "score": "dot", "dim": int(user_vecs.shape[1])})
    return list(OUTPUTS)


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
    with store.atomic("model/training_curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def load_model(store: ArtifactStore, device: str = "cpu") -> Recommender:
    """Rebuild the trained model of a work directory from its artifacts (for serving / new items).

    The features and interactions must be the ones it was trained on (checked by checksum). A
    model trained with CLEAR's dynamic mode gets its hook back from the settings in model.json
    and the directions saved with its weights.
    """
    info = store.read_json("model/model.json")
    data = load_data(store)
    if store.checksum("interactions.parquet") != info["interactions_sha256"]:
        raise ArtifactError("interactions.parquet changed since the model was trained; rerun 'clearrec run --only train'")
    for m, fi in info["features"].items():
        if data.feature_info.get(m, {}).get("sha256") != fi["sha256"]:
            raise ArtifactError(f"{fi['file']} changed since the model was trained; rerun 'clearrec run --only train'")
    for m in list(data.features):
        if m not in info["features"]:
            del data.features[m], data.feature_info[m]
    cls = backbone_class(info["backbone"])
    hp = {k: v for k, v in info["hyperparameters"].items() if k != "modalities"}
    kwargs: dict[str, Any] = {"num_users": data.num_users, "num_items": data.num_items, **hp}
    if cls.uses_graph:
        users, items = data.splits["train"].pairs(torch.arange(data.num_users))
        kwargs["edge_index"] = torch.stack([users, items])
    if cls.uses_features:
        kwargs["image_features"] = data.features.get("image")
        kwargs["text_features"] = data.features.get("text")
        cache = info.get("item_graph_cache")
        if cache and store.exists(cache):
            t, _ = store.read_tensors(cache)
            kwargs["item_graph"] = tuple(torch.from_numpy(t[k]) for k in ("rows", "cols", "values"))
        if info.get("clear_dynamic"):
            kwargs["modality_hook"] = _dynamic_clear(info["clear_dynamic"])
    model = cls(**kwargs)
    tensors, _ = store.read_tensors("model/model.safetensors")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    return model.to(device).eval()


SPEC = StageSpec(
    name="train",
    run=run,
    inputs=("users.parquet", "items.parquet", "interactions.parquet", *FEATURE_FILES.values()),
    outputs=OUTPUTS,
    config_keys=("train", "project.enabled", "project.mode", *(f"project.{key}" for key in DYNAMIC_KEYS)),
    code=("clearrec.models.clear", "clearrec.models.clear_dynamic", "clearrec.models.base", "clearrec.models.graph", "clearrec.models.metrics", "clearrec.models.trainer",
          "clearrec.models.registry", "clearrec.models.lightgcn", "clearrec.models.vbpr", "clearrec.models.freedom"),
    description="train the graph recommender (BPR, early stopping on valid) and export user / item vectors",
)
