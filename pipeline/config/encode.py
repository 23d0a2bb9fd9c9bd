"""``[encode]``: which encoders turn item images and text into feature vectors, and how the work runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ...models.text import DEFAULT_TEXT_TEMPLATE
from .base import Section


class EncodeConfig(Section):
    # open_clip:ARCH/PRETRAINED_TAG (weights from the local cache), local-dir:PATH (open_clip folder),
    # open_clip-untrained:ARCH?seed=N&image_size=PX (random weights), "imported", or "none" (no image features)
    image_encoder: str = "open_clip:ViT-B-32/laion2b_s34b_b79k"
    # all-MiniLM-L6-v2 (shipped offline), a sentence-transformers folder or cached name,
    # clip-text:<image encoder identifier>, "imported", or "none" (no text features)
    text_encoder: str = "all-MiniLM-L6-v2"
    text_template: str = DEFAULT_TEXT_TEMPLATE  # "{title}. {description}": columns of items.parquet in braces (the text column)
    normalize: bool = True  # L2-normalise each vector
    batch_size: int = Field(64, ge=1, le=65536)  # items per model call
    shard_size: int = Field(1024, ge=1, le=1 << 24)  # items per resumable shard (one file + completion marker each)
    num_workers: int = Field(2, ge=0, le=256)  # threads reading / decoding images while the model runs; 0 = inline
    threads: int = Field(0, ge=0, le=1024)  # torch CPU threads in the local backend; 0 = the CPUs this process may use
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: start a local Ray (or use the one already initialised)
    ray_actors: int = Field(2, ge=1, le=4096)  # actor-pool size in Ray mode (each actor loads the encoder once)
    ray_cpus_per_actor: int = Field(1, ge=1, le=1024)  # CPUs reserved per actor (= its torch threads)
    ray_gpus_per_actor: float = Field(0.0, ge=0, le=64)  # GPUs per actor; > 0 runs the actors' models on CUDA
    # policy for items without a vector, applied downstream by the project stage:
    # "mean" fills them with the modality's mean vector and flags them; "drop" keeps them null
    missing: Literal["mean", "drop"] = "mean"
    # decompression-bomb cap in pixels (width x height); at most Pillow's own warning limit, 89,478,485
    max_image_pixels: int = Field(40_000_000, ge=1, le=89_478_485)
    remote_images: bool = False  # fetch http(s) image URLs; false gives them status "remote_disabled"
    http_timeout_s: float = Field(10.0, gt=0, le=3600)  # wall-clock seconds per remote image (DNS, connect, redirects, body)
    http_max_bytes: int = Field(20_000_000, ge=1, le=2**31)  # larger remote images get status "too_large"
    http_max_redirects: int = Field(5, ge=0, le=20)  # redirects followed per image (http(s) only, each re-checked)
    # fetch from loopback / private / link-local / reserved addresses; false gives them "blocked_address"
    http_allow_private: bool = False
    # texts longer than this are cut to it before tokenizing (flagged truncated = true in the features file)
    max_text_chars: int = Field(20_000, ge=1, le=1 << 30)

    @field_validator("image_encoder", "text_encoder")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('set an encoder identifier, or "none" to skip the modality')
        return v.strip()
