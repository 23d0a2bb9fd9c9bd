"""Tiny encoders and catalogs for the encoder and encode-stage tests, built offline per test session.

- :func:`tiny_clip_dir`: an open_clip model with 1-layer towers saved in open_clip's ``local-dir:``
  layout (``open_clip_config.json`` + ``open_clip_model.safetensors``);
- :func:`tiny_sentence_dir`: a 1-layer BERT with a character vocabulary + mean pooling, saved as a
  sentence-transformers folder;
- :func:`write_catalog` / :func:`write_items`: image files and an ``items.parquet`` per the contract;
- :func:`png_header`: a PNG whose header claims any size (for the decompression-bomb guard).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from clearrec.pipeline.store import ArtifactStore

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_dir(folder: Path, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    config = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def tiny_sentence_dir(folder: Path, seed: int = 0, max_seq_length: int = 48) -> Path:
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    bert_dir = folder / "bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, ".", ",", *(f"##{c}" for c in chars)]
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(bert_dir / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    modules = [Transformer(str(bert_dir), max_seq_length=max_seq_length), Pooling(32, pooling_mode="mean")]
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(folder / "st"))
    return folder / "st"


def image_bytes(seed: int, size: int = 24, fmt: str = "PNG") -> bytes:
    """A small image with a pattern that differs per seed."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write_catalog(root: Path, n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` items with distinct PNG images under ``root/images``; returns their item rows."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        (root / "images" / f"p{i:04d}.png").write_bytes(image_bytes(i))
        rows.append({"item_id": f"P{i:04d}", "title": f"product {i}", "description": f"a thing numbered {i}",
                     "image": f"images/p{i:04d}.png"})
    return rows


def write_items(workdir: Path, rows: list[dict[str, Any]], catalog_root: Path) -> ArtifactStore:
    """``items.parquet`` per the artifact contract (item_idx dense in row order)."""
    store = ArtifactStore(workdir)
    titles = [r.get("title", "") for r in rows]
    descriptions = [r.get("description", "") for r in rows]
    table = pa.table({
        "item_idx": pa.array(range(len(rows)), pa.int64()),
        "item_id": pa.array([r["item_id"] for r in rows], pa.string()),
        "title": pa.array(titles, pa.string()),
        "description": pa.array(descriptions, pa.string()),
        "text": pa.array([f"{t}. {d}".strip() for t, d in zip(titles, descriptions)], pa.string()),
        "image": pa.array([r.get("image") for r in rows], pa.string()),
    })
    meta = {"catalog_root": str(catalog_root.resolve()), "source": "test"}
    store.write_parquet("items.parquet", table, metadata=meta)
    return store


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")
