"""The train stage on work directories written here per the artifact contract."""

from __future__ import annotations

import io
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pytest
import torch
from clearrec.models.clear import ClearOptions
from clearrec.models.freedom import FREEDOM
from clearrec.pipeline.config import Config, load_config
from clearrec.pipeline.errors import ArtifactError, ConfigError
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.stage import StageContext
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors, vectors_to_arrow
from clearrec.stages import train
from rich.console import Console

NU, NI = 80, 50


def write_workdir(root, seed: int = 0, image_dim: int | None = 24, text_dim: int | None = 12,
                  clear_enabled: bool = True, projector: str | None = "f" * 64) -> ArtifactStore:
    """users / items / interactions (8 per user: 6 train, 1 valid, 1 test) and *_clear features."""
    rng = np.random.default_rng(seed)
    store = ArtifactStore(root)
    store.write_parquet("users.parquet", pa.table({"user_idx": pa.array(np.arange(NU), pa.int64()),
                                                   "user_id": [f"user{u}" for u in range(NU)]}))
    store.write_parquet("items.parquet", pa.table({"item_idx": pa.array(np.arange(NI), pa.int64()),
                                                   "item_id": [f"item{i}" for i in range(NI)]}))
    users, items, split = [], [], []
    for u in range(NU):
        cluster = np.arange(u % 5, NI, 5)
        for j, i in enumerate(rng.choice(cluster, 8, replace=False)):
            users.append(u)
            items.append(int(i))
            split.append("train" if j < 6 else ("valid" if j == 6 else "test"))
    store.write_parquet("interactions.parquet", pa.table({
        "user_idx": pa.array(users, pa.int64()), "item_idx": pa.array(items, pa.int64()),
        "timestamp": pa.array([None] * len(users), pa.int64()), "rating": pa.array([None] * len(users), pa.float64()),
        "split": pa.array(split)}))
    centers = rng.normal(size=(5, 64))
    for modality, dim in (("image", image_dim), ("text", text_dim)):
        if dim is None:
            continue
        x = (centers[np.arange(NI) % 5, :dim] + 0.5 * rng.normal(size=(NI, dim))).astype(np.float32)
        store.write_parquet(f"features/{modality}_clear.parquet", pa.table({
            "item_idx": pa.array(np.arange(NI), pa.int64()), "item_id": [f"item{i}" for i in range(NI)],
            "vector": vectors_to_arrow(x), "status": ["ok"] * NI, "error": pa.array([None] * NI, pa.string()),
            "content_sha256": [f"{i:064x}" for i in range(NI)]}),
            metadata={"modality": modality, "encoder": "test", "dim": dim, "normalized": False, "preprocess": "none",
                      "untrained": True, "projector": projector if clear_enabled else None,
                      "clear_enabled": clear_enabled})
    return store


def config(**overrides) -> Config:
    base = {"train.epochs": 4, "train.batch_size": 128, "train.lr": 0.01, "train.embedding_size": 16,
            "train.threads": 1}
    base.update(overrides)
    return Config().with_overrides(base)


def run(store: ArtifactStore, cfg: Config):
    """The train stage; CLEAR's mode reaches it as the project stage writes it, in clear/projector.json."""
    if cfg.project.enabled and cfg.project.mode == "dynamic":
        options = ClearOptions(**{f.name: getattr(cfg.project, f.name) for f in fields(ClearOptions)
                                  if f.name not in ("visual", "text")})
        store.write_json("clear/projector.json", {"mode": "dynamic", **options.to_json(), "k": None})
    buf = io.StringIO()
    result = train.run(StageContext(store, cfg, Console(file=buf, width=120)))
    return result, buf.getvalue()


@pytest.mark.parametrize("backbone", ["lightgcn", "vbpr", "freedom"])
def test_stage_writes_the_contract_outputs(tmp_path, backbone):
    store = write_workdir(tmp_path)
    result, out = run(store, config(**{"train.backbone": backbone}))
    expected = [n for n in train.OUTPUTS if n != "model/content.safetensors" or backbone == "vbpr"]
    assert sorted(result.outputs) == sorted(expected)
    for name in expected:
        assert store.exists(name), name
    metrics = store.read_json("model/metrics.json")
    assert 1 <= metrics["best_epoch"] <= 4
    assert set(metrics["valid"]) == set(metrics["test"]) == {
        f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit", "mrr", "coverage", "popularity", "gini")
        for k in (5, 10, 20, 50)}
    assert len(metrics["history"]) == 4
    info = store.read_json("model/model.json")
    assert info["backbone"] == backbone and info["best_epoch"] == metrics["best_epoch"]
    assert info["features"]["image"]["sha256"] == store.checksum("features/image_clear.parquet")
    assert info["projector"] == "f" * 64
    assert "recall@20" in out and "best epoch" in out  # the metrics table
    assert store.path("model/training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    users = store.read_parquet("model/user_vectors.parquet")
    items = store.read_parquet("model/item_vectors.parquet")
    assert users["user_id"].to_pylist() == [f"user{u}" for u in range(NU)]
    assert items["item_idx"].to_pylist() == list(range(NI))


@pytest.mark.parametrize(("backbone", "mode"), [("lightgcn", "static"), ("vbpr", "static"), ("freedom", "static"),
                                                ("vbpr", "dynamic")])
def test_saved_vectors_and_reloaded_model_give_the_model_scores(tmp_path, backbone, mode):
    store = write_workdir(tmp_path)
    cfg = config(**{"train.backbone": backbone, "project.mode": mode, "project.k": 2})
    run(store, cfg)
    u_vecs, _ = arrow_to_vectors(store.read_parquet("model/user_vectors.parquet")["vector"])
    i_vecs, _ = arrow_to_vectors(store.read_parquet("model/item_vectors.parquet")["vector"])
    model = train.load_model(store)
    users = torch.arange(NU)
    own = model.full_scores(users)
    torch.testing.assert_close(torch.from_numpy(u_vecs @ i_vecs.T), own, rtol=1e-5, atol=1e-5)
    again = train.load_model(store).full_scores(users)
    assert torch.equal(own, again)


def test_clear_on_and_off_both_run_and_never_share_a_graph(tmp_path):
    on = write_workdir(tmp_path / "on", seed=0, clear_enabled=True)
    off = write_workdir(tmp_path / "off", seed=1, clear_enabled=False)  # other (unprojected) vectors
    graphs = []
    for store, enabled in ((on, True), (off, False)):
        run(store, config(**{"train.backbone": "freedom", "project.enabled": enabled}))
        info = store.read_json("model/model.json")
        assert info["features"]["text"]["clear_enabled"] is enabled
        graphs.append(info["item_graph_cache"])
        assert store.exists(info["item_graph_cache"])
    assert graphs[0] != graphs[1]


def test_graph_cache_keeps_only_the_most_recently_used_graphs(tmp_path):
    import os

    store = write_workdir(tmp_path)
    cfg = config(**{"train.backbone": "freedom", "train.epochs": 1})
    run(store, cfg)
    used = store.path(store.read_json("model/model.json")["item_graph_cache"])
    stale = [used.parent / f"item_graph-{i:024d}.safetensors" for i in range(4)]
    for i, p in enumerate(stale):
        p.write_bytes(b"old")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))  # older than the used graph; stale[3] newest of them
    os.utime(used, (1, 1))  # the graph in use was last touched long ago, and is used again now
    run(store, cfg)
    left = sorted(p.name for p in used.parent.glob("item_graph-*.safetensors"))
    assert left == sorted([used.name, stale[3].name, stale[2].name])


def test_changed_features_get_a_new_graph_not_the_cached_one(tmp_path):
    store = write_workdir(tmp_path, seed=0)
    cfg = config(**{"train.backbone": "freedom"})
    run(store, cfg)
    first = store.read_json("model/model.json")["item_graph_cache"]
    write_workdir(tmp_path / "other", seed=3)  # same items, other text vectors
    store.write_bytes("features/text_clear.parquet", (tmp_path / "other" / "features" / "text_clear.parquet").read_bytes())
    run(store, cfg)
    second = store.read_json("model/model.json")["item_graph_cache"]
    assert first != second and store.exists(first) and store.exists(second)
    image, text = (torch.from_numpy(arrow_to_vectors(store.read_parquet(f"features/{m}_clear.parquet")["vector"])[0])
                   for m in ("image", "text"))
    rows, cols, _ = FREEDOM.build_item_graph({"image": image, "text": text}, 10)
    cached, _ = store.read_tensors(second)
    assert np.array_equal(cached["rows"], rows.numpy()) and np.array_equal(cached["cols"], cols.numpy())
    stale, _ = store.read_tensors(first)
    assert not (stale["cols"].shape == cached["cols"].shape and np.array_equal(stale["cols"], cached["cols"]))


def test_graph_cache_keys_on_the_resolved_modality_weights(tmp_path):
    store = write_workdir(tmp_path)
    names = []
    for weights in ({}, {"image": 1, "text": 9}, {"image": 0.5, "text": 0.5}):
        run(store, config(**{"train.backbone": "freedom", "train.epochs": 1,
                             "train.freedom.modality_weights": weights}))
        info = store.read_json("model/model.json")
        names.append(info["item_graph_cache"])
    assert names[0] == names[1] != names[2]  # 1 : 9 is the default 0.1 / 0.9 once normalised
    assert info["hyperparameters"]["graph_weights"] == {"image": 0.5, "text": 0.5}
    with pytest.raises(ConfigError, match=r"train.backbone = 'freedom'.*\['audio', 'image'\].*modality_weights"):
        run(store, config(**{"train.backbone": "freedom", "train.freedom.modality_weights": {"image": 1, "audio": 1}}))


def test_the_retired_image_weight_key_says_what_to_write(tmp_path):
    with pytest.raises(ConfigError, match=r"write modality_weights = \{image = 0.1, text = 0.9\} in \[train.freedom\]"):
        Config().with_overrides({"train.freedom.image_weight": 0.1})
    path = tmp_path / "clearrec.toml"
    path.write_text("[train.freedom]\nimage_weight = 0.25\n")
    with pytest.raises(ConfigError, match=r"modality_weights = \{image = 0.25, text = 0.75\}"):
        load_config(path)
    assert "image_weight" not in Config().train.freedom.model_dump()


def test_dynamic_mode_needs_two_modalities_and_takes_per_modality_switches(tmp_path):
    one = write_workdir(tmp_path / "one", image_dim=None)
    with pytest.raises(ConfigError, match=r"needs at least two modalities; the work directory has \['text'\]"):
        run(one, config(**{"train.backbone": "vbpr", "project.mode": "dynamic"}))
    store = write_workdir(tmp_path / "two")
    store.write_json("clear/projector.json", {"mode": "dynamic", **ClearOptions(k=2).to_json(), "k": None,
                                              "project": {"text": False}})
    train.run(StageContext(store, config(**{"train.backbone": "vbpr"}), Console(file=io.StringIO())))
    assert store.read_json("model/model.json")["clear_dynamic"]["project"] == {"text": False}
    model = train.load_model(store)
    assert model.modality_hook.project == {"text": False} and not model.modality_hook.projects("text")
    parts = model.content_pathway().modality_parts(model.features)
    out = model.modality_hook(parts)
    assert out["text"] is parts["text"] and not torch.equal(out["image"], parts["image"])


def test_freedom_without_features_names_the_config_keys(tmp_path):
    store = write_workdir(tmp_path, image_dim=None, text_dim=None)
    with pytest.raises(ConfigError, match=r"train.backbone = 'freedom' needs item features.*encode.modalities"):
        run(store, config(**{"train.backbone": "freedom"}))


def test_text_only_features_train_and_say_so(tmp_path):
    store = write_workdir(tmp_path, image_dim=None)
    _, out = run(store, config(**{"train.backbone": "freedom"}))
    assert "one modality only (text)" in out
    assert store.read_json("model/model.json")["hyperparameters"]["modalities"] == ["text"]


def test_lightgcn_needs_no_features(tmp_path):
    store = write_workdir(tmp_path, image_dim=None, text_dim=None)
    run(store, config(**{"train.backbone": "lightgcn"}))
    assert store.read_json("model/model.json")["features"] == {}


def test_dynamic_clear_mode_refits_once_per_epoch_and_saves_its_directions(tmp_path, monkeypatch):
    from clearrec.models.clear_dynamic import DynamicClear

    refits = []
    real = DynamicClear.refit

    def spy(self, embeddings):
        refits.append((self.options.k, self.options.strength, tuple(embeddings["image"].shape)))
        return real(self, embeddings)

    monkeypatch.setattr(DynamicClear, "refit", spy)
    for backbone in ("freedom", "vbpr"):
        refits.clear()
        store = write_workdir(tmp_path / backbone)
        run(store, config(**{"train.backbone": backbone, "project.mode": "dynamic", "project.k": 2,
                             "train.epochs": 3, "train.patience": 10}))
        assert len(refits) == 3 and refits[0][:2] == (2, 1.0) and refits[0][2][1] == 16
        assert store.read_json("model/model.json")["clear_dynamic"]["k_requested"] == 2
        tensors, _ = store.read_tensors("model/model.safetensors")
        assert tensors["modality_hook.dirs_image"].shape == (16, 2)
        assert tensors["modality_hook.dirs_text"].shape == (16, 2)
    refits.clear()
    run(write_workdir(tmp_path / "static"), config(**{"train.backbone": "freedom", "train.epochs": 1}))
    assert not refits


def test_dynamic_vbpr_projects_new_items_with_the_saved_directions(tmp_path):
    store = write_workdir(tmp_path)
    cfg = config(**{"train.backbone": "vbpr", "project.mode": "dynamic", "project.k": 2})
    run(store, cfg)
    model = train.load_model(store)
    _, items = model.vectors()
    data = train.load_data(store)
    # the catalog's own features through the cold-start pathway: the same content half as the
    # trained item vectors, whatever else is in the batch (no refit on the new rows)
    image, text = data.features["image"], data.features["text"]
    new = model.content_item_vectors({"image": image[:5], "text": text[:5]})
    torch.testing.assert_close(new[:, 16:], items[:5, 16:], rtol=1e-5, atol=1e-5)
    both = model.content_item_vectors({"image": image[:5] * 3, "text": text[:5]})
    torch.testing.assert_close(model.content_item_vectors({"image": image[:1] * 3, "text": text[:1]}),
                               both[:1], rtol=1e-5, atol=1e-5)


def test_dynamic_clear_changes_training(tmp_path):
    losses = []
    for mode in ("static", "dynamic"):
        store = write_workdir(tmp_path / mode)
        run(store, config(**{"train.backbone": "vbpr", "project.mode": mode, "project.k": 4, "train.epochs": 2}))
        losses.append([h["loss"] for h in store.read_json("model/metrics.json")["history"]])
    assert losses[0] != losses[1]


def test_nan_features_are_refused(tmp_path):
    store = write_workdir(tmp_path)
    t = store.read_parquet("features/text_clear.parquet")
    x, _ = arrow_to_vectors(t["vector"])
    x[3, 2] = np.nan
    store.write_parquet("features/text_clear.parquet", t.set_column(t.schema.get_field_index("vector"), "vector",
                                                                     vectors_to_arrow(x)))
    with pytest.raises(ArtifactError, match="NaN"):
        run(store, config(**{"train.backbone": "freedom"}))


def test_stage_is_deterministic_for_a_seed(tmp_path):
    vecs = []
    for sub in ("a", "b"):
        store = write_workdir(tmp_path / sub)
        run(store, config(**{"train.backbone": "freedom", "train.epochs": 2}))
        vecs.append(store.read_parquet("model/item_vectors.parquet")["vector"])
    assert vecs[0].equals(vecs[1])


def test_unknown_backbone_and_bad_stop_metric_are_config_errors():
    with pytest.raises(ConfigError, match="backbone"):
        config(**{"train.backbone": "lightgnc"})
    with pytest.raises(ConfigError, match="stop_metric"):
        config(**{"train.stop_metric": "recall@15"})


def test_runner_skips_train_when_up_to_date(tmp_path):
    store = write_workdir(tmp_path)
    cfg = config(**{"train.backbone": "lightgcn", "train.epochs": 2})
    buf = io.StringIO()
    runner = Runner([train.SPEC], cfg, tmp_path, console=Console(file=buf, width=120))
    runner.run([train.SPEC])
    assert runner.status()["train"].state == "up-to-date"
    first = store.checksum("model/model.safetensors")
    runner.run([train.SPEC])
    assert store.checksum("model/model.safetensors") == first
    changed = Runner([train.SPEC], cfg.with_overrides({"train.lr": 0.02}), tmp_path, console=Console(file=buf))
    assert changed.status()["train"].state == "stale"


def test_cached_item_graph_is_reused_for_the_same_features(tmp_path, monkeypatch):
    store = write_workdir(tmp_path)
    cfg = config(**{"train.backbone": "freedom", "train.epochs": 1})
    run(store, cfg)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the item-item graph was rebuilt although its cache exists")

    monkeypatch.setattr(FREEDOM, "build_item_graph", staticmethod(no_rebuild))
    run(store, cfg.with_overrides({"train.lr": 0.02}))  # other training settings, same features
    with pytest.raises(AssertionError, match="rebuilt"):
        run(store, cfg.with_overrides({"train.freedom.knn_k": 5}))  # another graph: not the cached one


def test_load_model_refuses_changed_inputs(tmp_path):
    store = write_workdir(tmp_path)
    cfg = config(**{"train.backbone": "lightgcn", "train.epochs": 1})
    run(store, cfg)
    write_workdir(tmp_path / "other", seed=5)
    store.write_bytes("interactions.parquet", (tmp_path / "other" / "interactions.parquet").read_bytes())
    with pytest.raises(ArtifactError, match="interactions.parquet changed"):
        train.load_model(store)


def test_threads_setting_is_restored_and_missing_cuda_is_a_config_error(tmp_path):
    store = write_workdir(tmp_path)
    before = torch.get_num_threads()
    run(store, config(**{"train.backbone": "lightgcn", "train.epochs": 1, "train.threads": 1}))
    assert torch.get_num_threads() == before
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            run(store, config(**{"train.backbone": "lightgcn", "train.device": "cuda"}))


@pytest.mark.parametrize("backbone", ["lattice", "mgcn", "smore", "mmgcn", "bm3", "lgmrec", "bpr", "pop", "itemknncbf"])
def test_backbones_taking_a_feature_mapping_train_and_reload(tmp_path, backbone):
    store = write_workdir(tmp_path)
    result, _ = run(store, config(**{"train.backbone": backbone, "train.epochs": 2}))
    assert store.read_json("model/model.json")["backbone"] == backbone
    _, items = train.load_model(store).vectors()  # rebuilt from model.json + model.safetensors alone
    saved, _ = arrow_to_vectors(store.read_parquet("model/item_vectors.parquet")["vector"])
    np.testing.assert_allclose(items.numpy(), saved, rtol=1e-5, atol=1e-6)


def test_dynamic_clear_on_a_backbone_without_modality_embeddings_says_it_has_no_effect(tmp_path):
    store = write_workdir(tmp_path)
    _, out = run(store, config(**{"train.backbone": "itemknncbf", "project.mode": "dynamic", "project.k": 2}))
    assert "has no effect on itemknncbf" in out
    assert store.read_json("model/model.json")["clear_dynamic"] is None


@pytest.mark.parametrize(("backbone", "overrides", "decay"), [
    ("mgcn", {}, 0.96), ("lattice", {}, 0.96), ("smore", {}, 0.96), ("freedom", {}, 1.0),
    ("mgcn", {"train.lr_decay": 1.0}, 1.0), ("bm3", {"train.lr_decay": 0.5, "train.lr_decay_epochs": 10}, 0.5),
])
def test_learning_rate_decay_defaults_to_the_backbones_reference(tmp_path, backbone, overrides, decay):
    store = write_workdir(tmp_path)
    run(store, config(**{"train.backbone": backbone, "train.epochs": 1, **overrides}))
    training = store.read_json("model/model.json")["training"]
    assert training["lr_decay"] == [decay, overrides.get("train.lr_decay_epochs", 50)]


@pytest.mark.parametrize("backbone", ["mgcn", "bm3", "freedom"])
def test_the_loaded_feature_tables_are_released_before_training(tmp_path, monkeypatch, backbone):
    """Backbones with trainable features train a copy of them: the stage must not hold the loaded tables too."""
    import gc
    import weakref

    from clearrec.models import trainer

    store = write_workdir(tmp_path)
    loaded: list[weakref.ref] = []
    real_load, real_fit = train.load_data, trainer.fit

    def load_data(st):
        data = real_load(st)
        loaded.extend(weakref.ref(x) for x in data.features.values())
        return data

    def fit(*args, **kwargs):
        gc.collect()
        held = [r for r in loaded if r() is not None]
        assert loaded and not held, f"{len(held)} of {len(loaded)} loaded feature tables still held during training"
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train, "load_data", load_data)
    monkeypatch.setattr(trainer, "fit", fit)
    run(store, config(**{"train.backbone": backbone, "train.epochs": 1}))
