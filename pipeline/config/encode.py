"""``[encode]``: the item modalities (one ``[encode.modalities.<name>]`` table each), and how the work runs."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ...models.text import DEFAULT_TEXT_TEMPLATE
from .base import Section

NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # modality names become file names: features/<name>.parquet
IMAGE_PREFIXES = ("open_clip:", "open_clip-untrained:", "local-dir:")
RETIRED = ("image_encoder", "text_encoder", "text_template")  # the keys of the two fixed modalities


def encoder_kind(encoder: str) -> str:
    """What an encoder identifier reads: ``"image"`` (open_clip models), ``"text"`` (sentence
    encoders, ``clip-text:``), ``"imported"`` (precomputed vectors) or ``"none"`` (not encoded)."""
    if encoder in ("imported", "none"):
        return encoder
    return "image" if encoder.startswith(IMAGE_PREFIXES) else "text"


class ModalityConfig(Section):
    """One item modality: an encoder and what it reads (``[encode.modalities.<name>]``)."""

    # open_clip:ARCH/PRETRAINED_TAG (weights from the local cache), local-dir:PATH (open_clip folder),
    # open_clip-untrained:ARCH?seed=N&image_size=PX (random weights): image encoders, read `column`;
    # all-MiniLM-L6-v2 (shipped offline), a sentence-transformers folder or cached name,
    # clip-text:<image encoder identifier>: text encoders, read `template`;
    # "imported": precomputed vectors from `file`; "none": the modality is declared but not encoded
    encoder: str
    template: str | None = None  # text encoders: columns of items.parquet in braces; default "{title}. {description}"
    column: str | None = None  # image encoders: the items column with a path (in catalog_root) or URL; default "image"
    # imported: a .npy (float16/32/64, row r = the item whose item_id is r) or a Parquet file (item_id + vector),
    # relative to the config file; unset: imported/<name>.parquet, written by ingest.format = "mmrec"
    file: str | None = None

    @field_validator("encoder")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('set an encoder identifier, "imported", or "none" to skip the modality')
        return v.strip()

    @property
    def kind(self) -> str:
        return encoder_kind(self.encoder)

    @property
    def text_template(self) -> str:
        return self.template or DEFAULT_TEXT_TEMPLATE

    @property
    def image_column(self) -> str:
        return self.column or "image"

    @model_validator(mode="after")
    def _check(self) -> "ModalityConfig":
        kind = self.kind
        wrong = [key for key, ok in (("template", kind == "text"), ("column", kind == "image"),
                                     ("file", kind == "imported")) if getattr(self, key) is not None and not ok]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} does not apply to encoder {self.encoder!r} (a {kind} encoder): "
                             "template is for text encoders, column for image encoders, file for \"imported\"")
        return self


def _default_modalities() -> dict[str, ModalityConfig]:
    return {"image": ModalityConfig(encoder="open_clip:ViT-B-32/laion2b_s34b_b79k"),
            "text": ModalityConfig(encoder="all-MiniLM-L6-v2")}


def retired_keys_message(section: dict[str, Any], where: str) -> str:
    """The error for ``image_encoder`` / ``text_encoder`` / ``text_template``: the equivalent new tables."""
    old = {k: section[k] for k in RETIRED if k in section}
    lines = []
    for name in ("image", "text"):
        encoder = old.get(f"{name}_encoder", _default_modalities()[name].encoder)
        if encoder == "none":
            continue
        lines += [f"[encode.modalities.{name}]", f"encoder = {_toml_str(encoder)}"]
        if name == "text" and "text_template" in old and encoder_kind(encoder) == "text":
            lines.append(f"template = {_toml_str(old['text_template'])}")
        lines.append("")
    return (f"{', '.join('encode.' + k for k in old)} {where} are no longer read: each modality is a table of its "
            "own. Replace them with:\n\n" + "\n".join(lines).rstrip() + "\n\n(a modality left out is not encoded)")


def _toml_str(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value})[4:].strip()


class EncodeConfig(Section):
    # the item modalities by name (lowercase identifiers, in declared order): one table each, see ModalityConfig
    modalities: dict[str, ModalityConfig] = Field(default_factory=_default_modalities)
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

    @classmethod
    def retired(cls, key: str, data: dict[str, Any], where: str) -> str | None:
        return retired_keys_message(data, where) if key in RETIRED else None

    @field_validator("modalities")
    @classmethod
    def _names(cls, v: dict[str, ModalityConfig]) -> dict[str, ModalityConfig]:
        bad = [n for n in v if not NAME.match(n) or n.endswith("_clear")]
        if bad:
            raise ValueError(f"modality names {bad} must be lowercase identifiers (a-z, then a-z, 0-9 or _), "
                             "not ending in _clear: they become file names features/<name>.parquet")
        return v
