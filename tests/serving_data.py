"""A synthetic work directory with planted clusters, written per the artifact contract.

Used by the index, API and service tests. Six themes; each item belongs to one. Its text is
a real title encoded with the real MiniLM text encoder; its "image" vector is its theme's
palette colour mapped through :class:`PaletteEncoder` (a deterministic stand-in for an image
encoder: solid-colour images of one theme land near each other); its model vector is its
theme's centroid plus noise, and each user's vector sits near one theme. The CLEAR projector
is fitted for real on the two feature matrices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from clearrec.models.clear import ClearOptions
from clearrec.models.clear_multi import MultiClearProjector
from clearrec.pipeline.store import ArtifactStore, vectors_to_arrow

THEMES = [
    ("wooden toy train", ["red", "small", "classic", "painted", "pull-along"]),
    ("baby bottle", ["glass", "anti-colic", "slow-flow", "wide-neck", "BPA-free"]),
    ("cotton swaddle blanket", ["muslin", "soft", "organic", "striped", "breathable"]),
    ("convertible car seat", ["rear-facing", "harness", "side-impact", "compact", "padded"]),
    ("jogging stroller", ["all-terrain", "folding", "lightweight", "three-wheel", "suspension"]),
    ("silicone teething ring", ["chilled", "textured", "food-grade", "soothing", "chewable"]),
]
PALETTE = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 220], [230, 220, 40], [200, 40, 210], [30, 210, 210]],
                   dtype=np.float32)  # (themes, RGB)
IMAGE_ENCODER = "test:palette-16"
PER_THEME, USERS, D_CF, D_IMG = 30, 60, 16, 16


class PaletteEncoder:
    """Stand-in image encoder: mean colour -> soft assignment to the palette -> (16,) vector."""

    identity = IMAGE_ENCODER
    dim = D_IMG

    def __init__(self) -> None:
        self.basis = np.random.default_rng(7).standard_normal((len(PALETTE), D_IMG)).astype(np.float32)

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        rgb = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0) for im in images])
        dist = ((rgb[:, None, :] - PALETTE[None]) ** 2).sum(-1) / 2000.0  # (B, themes)
        w = np.exp(-dist)
        w /= w.sum(1, keepdims=True)
        return (w @ self.basis).astype(np.float32)  # (B, 16)


def png(theme: int, size: int = 24) -> bytes:
    """A solid image in ``theme``'s colour, as PNG bytes."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(int(c) for c in PALETTE[theme])).save(buf, format="PNG")
    return buf.getvalue()


def build_workdir(root: Path, text_encoder, seed: int = 0, missing_image: int = 3) -> dict:
    """Write the artifacts of a finished ``train`` stage under ``root``; return the planted truth."""
    rng = np.random.default_rng(seed)
    store = ArtifactStore(root)
    n = PER_THEME * len(THEMES)
    theme = np.repeat(np.arange(len(THEMES)), PER_THEME)
    ids = [f"item{i:03d}" for i in range(n)]
    titles = [f"{THEMES[t][1][i % 5]} {THEMES[t][0]} no. {i}" for i, t in enumerate(theme)]
    catalog = root / "catalog"
    catalog.mkdir(parents=True, exist_ok=True)
    store.write_parquet("items.parquet", pa.table({
        "item_idx": pa.array(np.arange(n), pa.int64()), "item_id": ids, "title": titles,
        "description": [""] * n, "text": titles, "image": pa.array([None] * n, pa.string())}),
        metadata={"catalog_root": str(catalog), "source": "synthetic"})

    text = text_encoder.encode(titles)  # (n, 384), L2-normalised
    image = PaletteEncoder().encode([Image.new("RGB", (4, 4), tuple(int(c) for c in PALETTE[t])) for t in theme])
    image += 0.02 * rng.standard_normal(image.shape).astype(np.float32)
    img_valid = np.ones(n, dtype=bool)
    img_valid[rng.choice(n, missing_image, replace=False)] = False  # a few items without an image
    raw = {"image": (image, img_valid, IMAGE_ENCODER), "text": (text, np.ones(n, dtype=bool), text_encoder.identity)}
    for m, (x, valid, enc) in raw.items():
        store.write_parquet(f"features/{m}.parquet", _features(ids, x, valid),
                            metadata={"modality": m, "kind": m, "encoder": enc, "dim": x.shape[1],
                                      "normalized": m == "text", "preprocess": "test", "untrained": False})

    proj = MultiClearProjector(ClearOptions(k=2), ["image", "text"]).fit({"image": image[img_valid],
                                                                          "text": text[img_valid]})
    tensors, meta = proj.state_dict()
    store.write_tensors("clear/projector.safetensors", tensors, metadata={"format": meta["format"]})
    sha = store.checksum("clear/projector.safetensors")
    store.write_json("clear/projector.json", {**meta, "sha256": sha, "inputs": {m: {} for m in ("image", "text")}})
    projected = {"image": proj.transform("image", image), "text": proj.transform("text", text)}
    raw_fill = {"image": image[img_valid].mean(0), "text": text.mean(0)}
    fill = {"image": proj.transform("image", raw_fill["image"][None])[0], "text": proj.transform("text", text.mean(0))}
    projected["image"][~img_valid] = fill["image"]
    store.write_tensors("clear/fill.safetensors", {
        **{m: np.ascontiguousarray(v, np.float32) for m, v in fill.items()},
        **{f"{m}.raw": np.ascontiguousarray(v, np.float32) for m, v in raw_fill.items()}})
    for m, (_, valid, enc) in raw.items():
        table = _features(ids, projected[m], np.ones(n, dtype=bool)).append_column("filled", pa.array(~valid))
        store.write_parquet(f"features/{m}_clear.parquet", table,
                            metadata={"modality": m, "encoder": enc, "dim": projected[m].shape[1], "normalized": False,
                                      "projector": sha, "clear_enabled": True, "missing": "mean"})

    centroids = 3.0 * rng.standard_normal((len(THEMES), D_CF)).astype(np.float32)
    items = centroids[theme] + 0.7 * rng.standard_normal((n, D_CF)).astype(np.float32)  # (n, 16)
    user_theme = rng.integers(0, len(THEMES), USERS)
    users = centroids[user_theme] + 0.7 * rng.standard_normal((USERS, D_CF)).astype(np.float32)
    rows = []
    for u, t in enumerate(user_theme):
        picked = rng.choice(np.flatnonzero(theme == t), 6, replace=False)
        rows += [(u, int(i), ("train", "train", "train", "train", "valid", "test")[j]) for j, i in enumerate(picked)]
    u_idx, i_idx, split = map(list, zip(*rows))
    store.write_parquet("interactions.parquet", pa.table({
        "user_idx": pa.array(u_idx, pa.int64()), "item_idx": pa.array(i_idx, pa.int64()),
        "timestamp": pa.array([None] * len(rows), pa.int64()), "rating": pa.array([None] * len(rows), pa.float64()),
        "split": split}))
    user_ids = [f"user{u:02d}" for u in range(USERS)]
    store.write_parquet("users.parquet", pa.table({"user_idx": pa.array(np.arange(USERS), pa.int64()),
                                                   "user_id": user_ids}))
    store.write_parquet("model/item_vectors.parquet", pa.table({
        "item_idx": pa.array(np.arange(n), pa.int64()), "item_id": ids, "vector": vectors_to_arrow(items)}))
    store.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": pa.array(np.arange(USERS), pa.int64()), "user_id": user_ids, "vector": vectors_to_arrow(users)}))
    store.write_json("model/model.json", {"backbone": "lightgcn"})
    return {"theme": theme, "ids": ids, "titles": titles, "items": items, "users": users, "user_ids": user_ids,
            "user_theme": user_theme, "interactions": rows, "img_valid": img_valid}


def _features(ids: list[str], x: np.ndarray, valid: np.ndarray) -> pa.Table:
    n = len(ids)
    return pa.table({
        "item_idx": pa.array(np.arange(n), pa.int64()), "item_id": ids, "vector": vectors_to_arrow(x, valid),
        "status": ["ok" if v else "missing" for v in valid], "error": pa.array([None] * n, pa.string()),
        "content_sha256": ["0" * 64] * n})


def attach_vbpr(root: Path, embedding_dim: int = 8, seed: int = 0) -> None:
    """Replace the model with a (randomly initialised) VBPR written as the train stage writes it."""
    import torch

    from clearrec.models.vbpr import VBPR
    from clearrec.stages.train import load_data

    store = ArtifactStore(root)
    data = load_data(store)
    torch.manual_seed(seed)
    model = VBPR(data.num_users, data.num_items, data.features, embedding_dim=embedding_dim)
    store.write_tensors("model/model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    pathway = model.content_pathway()
    store.write_tensors("model/content.safetensors", {k: v.contiguous() for k, v in pathway.state_dict().items()})
    users, items = (v.numpy() for v in model.vectors())
    store.write_json("model/model.json", {"backbone": "vbpr", "settings": {"embedding_dim": embedding_dim},
                                          "hyperparameters": model.hparams(),
                                          "features": data.feature_info, "clear_dynamic": None,
                                          "content_pathway": {**pathway.settings(), "file": "model/content.safetensors"},
                                          "interactions_sha256": store.checksum("interactions.parquet")})
    store.write_parquet("model/item_vectors.parquet", pa.table({
        "item_idx": pa.array(np.arange(data.num_items), pa.int64()), "item_id": data.item_ids,
        "vector": vectors_to_arrow(items)}))
    store.write_parquet("model/user_vectors.parquet", pa.table({
        "user_idx": pa.array(np.arange(data.num_users), pa.int64()), "user_id": data.user_ids,
        "vector": vectors_to_arrow(users)}))
