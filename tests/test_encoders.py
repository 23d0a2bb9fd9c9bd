"""Encoders (open_clip, sentence-transformers, CLIP text tower), text templates, guarded image decoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from encode_fixtures import TINY_CLIP_CFG, image_bytes, png_header, tiny_clip_dir, tiny_sentence_dir
from PIL import Image, ImageFile

from clearrec.models.encoders import ImageDecodeError, load_image_encoder, load_text_encoder, safe_open_image
from clearrec.models.text import apply_text_template, apply_text_template_columns, template_fields
from clearrec.pipeline.errors import EncoderUnavailableError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory) -> Path:
    return tiny_sentence_dir(tmp_path_factory.mktemp("st"))


def _images(n: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image_bytes(i))).convert("RGB") for i in range(n)]


# ---- open_clip image tower --------------------------------------------------------------
def test_local_dir_open_clip_loads_saved_weights_and_preprocessing(clip_dir):
    import open_clip

    enc = load_image_encoder(f"local-dir:{clip_dir}")
    assert enc.identity == f"local-dir:{clip_dir.resolve()}"
    assert (enc.dim, enc.untrained, enc.normalize) == (16, False, True)
    assert "Resize(size=32" in enc.preprocess_desc and "0.25" in enc.preprocess_desc  # the folder's own transforms
    out = enc.encode(_images(3))
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the same numbers as open_clip itself gives from the same folder
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    with torch.no_grad():
        ref = F.normalize(model.eval().encode_image(torch.stack([transform(im) for im in _images(3)])), dim=-1)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
    # the batched uint8 -> float path gives exactly the per-image transform's input tensors
    pixels = torch.stack([enc.preprocess(im) for im in _images(3)])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32, 3)
    assert torch.equal(enc._to_model_input(pixels), torch.stack([transform(im) for im in _images(3)]))
    raw = load_image_encoder(f"local-dir:{clip_dir}", normalize=False).encode(_images(1))
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3


def test_local_dir_without_weights_or_config_is_unavailable(tmp_path, clip_dir):
    with pytest.raises(EncoderUnavailableError, match="open_clip_config.json not found"):
        load_image_encoder(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_bytes((clip_dir / "open_clip_config.json").read_bytes())
    with pytest.raises(EncoderUnavailableError, match="no weights"):
        load_image_encoder(f"local-dir:{tmp_path}")


@pytest.mark.slow
def test_untrained_open_clip_is_deterministic_flagged_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_image_encoder("open_clip-untrained:ViT-S-32?image_size=32&seed=0")
    assert torch.equal(torch.rand(1), expected_next)
    b = load_image_encoder("open_clip-untrained:ViT-S-32?seed=0&image_size=32")
    c = load_image_encoder("open_clip-untrained:ViT-S-32?seed=1&image_size=32")
    assert a.identity == b.identity == "open_clip-untrained:ViT-S-32?seed=0&image_size=32"
    assert a.untrained and a.dim == 384
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    imgs = _images(2)
    np.testing.assert_array_equal(a.encode(imgs), b.encode(imgs))
    with pytest.raises(EncoderUnavailableError, match="unknown option"):
        load_image_encoder("open_clip-untrained:ViT-S-32?layers=2")


def _empty_caches(monkeypatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache and home folder, hub access switched off."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path / "hub"


def test_default_image_encoder_offline_fails_fast_with_the_reason(tmp_path, monkeypatch):
    _empty_caches(monkeypatch, tmp_path)
    with pytest.raises(EncoderUnavailableError) as e:
        load_image_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in str(e.value) and "not on this machine" in str(e.value)
    with pytest.raises(EncoderUnavailableError, match="knows no tag"):
        load_image_encoder("open_clip:ViT-B-32/no_such_tag")


def test_pretrained_tag_is_read_from_the_local_cache(tmp_path, monkeypatch, clip_dir):
    """open_clip:ARCH/TAG resolves the tag's file in the Hugging Face cache, never the network."""
    import open_clip.factory
    import open_clip.pretrained

    hub = _empty_caches(monkeypatch, tmp_path)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Tiny-Test", TINY_CLIP_CFG)
    tag = open_clip.pretrained._pcfg(hf_hub="clearrec-test/tiny/", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Tiny-Test", {"t1": tag})
    with pytest.raises(EncoderUnavailableError, match="clearrec-test/tiny"):
        load_image_encoder("open_clip:Tiny-Test/t1")
    snapshot = hub / "models--clearrec-test--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (hub / "models--clearrec-test--tiny" / "refs").mkdir()
    (hub / "models--clearrec-test--tiny" / "refs" / "main").write_text("0123abcd")
    (snapshot / "open_clip_model.safetensors").write_bytes((clip_dir / "open_clip_model.safetensors").read_bytes())
    enc = load_image_encoder("open_clip:Tiny-Test/t1")
    assert enc.identity == "open_clip:Tiny-Test/t1" and not enc.untrained
    ref = load_image_encoder(f"local-dir:{clip_dir}")  # same weights and preprocessing
    assert enc.weights_sha256 == ref.weights_sha256
    np.testing.assert_allclose(enc.encode(_images(2)), ref.encode(_images(2)), atol=1e-6)


# ---- text encoders ----------------------------------------------------------------------
def test_sentence_transformers_folder_matches_the_library(st_dir):
    from sentence_transformers import SentenceTransformer

    enc = load_text_encoder(str(st_dir))
    assert enc.identity == f"sentence-transformers:{st_dir.resolve()}"
    assert (enc.dim, enc.untrained) == (32, False)
    texts = ["a red ball", "blue bottle 2", "x"]
    out = enc.encode(texts)
    assert out.shape == (3, 32) and out.dtype == np.float32
    ref = SentenceTransformer(str(st_dir), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # the identity loads the same encoder back (what query-time encoding relies on)
    np.testing.assert_array_equal(load_text_encoder(enc.identity).encode(texts), out)


def test_minilm_from_the_installed_package_puts_related_titles_nearer():
    enc = load_text_encoder("all-MiniLM-L6-v2")
    assert enc.identity == "sentence-transformers:all-MiniLM-L6-v2" and enc.dim == 384
    v = enc.encode(["Organic cotton baby swaddle blanket", "Soft muslin swaddle wrap for newborns",
                    "Stainless steel socket wrench set"])
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    assert float(v[0] @ v[1]) > float(v[1] @ v[2]) + 0.2


def test_clip_text_tower(clip_dir):
    import open_clip

    enc = load_text_encoder(f"clip-text:local-dir:{clip_dir}")
    assert enc.identity == f"clip-text:local-dir:{clip_dir.resolve()}" and enc.dim == 16
    out = enc.encode(["a red ball", "a blue bottle"])
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokens = open_clip.get_tokenizer(f"local-dir:{clip_dir}")(["a red ball", "a blue bottle"])
    with torch.no_grad():
        ref = F.normalize(model.eval().encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_unavailable_text_encoders_say_why(tmp_path, monkeypatch):
    _empty_caches(monkeypatch, tmp_path)
    with pytest.raises(EncoderUnavailableError, match="not in the local Hugging Face cache"):
        load_text_encoder("sentence-transformers/not-a-cached-model")
    with pytest.raises(EncoderUnavailableError, match="does not exist"):
        load_text_encoder(str(tmp_path / "missing-folder"))


def test_text_template():
    t = "{title}. {description}"
    fields = {"title": " Soft   blanket ", "description": "Warm.\n Cotton"}
    assert apply_text_template(t, fields) == "Soft blanket. Warm. Cotton"
    assert apply_text_template(t, {"title": "Soft blanket", "description": ""}) == "Soft blanket."
    assert apply_text_template(t, {"title": None, "description": "  "}) == ""
    assert template_fields("{brand}: {title}") == ["brand", "title"]
    for bad in ("{title!r}", "{title:>10}", "{a.b}", "{title"):
        with pytest.raises(ValueError):
            template_fields(bad)


@pytest.mark.parametrize("template", ["{title}. {description}", "  {a}\t:{b}{a} ", "{title}", "no fields"])
def test_text_template_on_columns_equals_the_row_by_row_join(template):
    """Every character str.split() splits on (and only those) collapses to one space, blank fields
    included, exactly as the row-by-row template does."""
    import random
    import sys

    import pyarrow as pa

    spaces = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
    alphabet = spaces + [" "] * 8 + list("ab.,\u00e9\u200b\ufeff\u00ad")  # zero-width / soft hyphen: not spaces
    rng = random.Random(7)
    names = sorted(set(template_fields(template)))
    rows = [{n: None if rng.random() < 0.1 else "".join(rng.choices(alphabet, k=rng.randint(0, 9))) for n in names}
            for _ in range(5000)]
    columns = {n: pa.array([r[n] for r in rows], pa.string()) for n in names}
    got = apply_text_template_columns(template, columns, len(rows)).to_pylist()
    assert got == [apply_text_template(template, r) for r in rows]


# ---- guarded image decoding -------------------------------------------------------------
def _code(source, **kw) -> str:
    with pytest.raises(ImageDecodeError) as e:
        safe_open_image(source, **kw)
    return e.value.code


def test_safe_open_image_decodes_from_bytes_and_path(tmp_path):
    data = image_bytes(1, fmt="JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    a, b = safe_open_image(data), safe_open_image(tmp_path / "a.jpg")
    assert a.mode == "RGB" and a.size == (24, 24)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_safe_open_image_failure_codes(tmp_path):
    jpeg = image_bytes(2, size=64, fmt="JPEG")
    (tmp_path / "empty.png").write_bytes(b"")
    assert _code(tmp_path / "nope.png") == "missing"
    assert _code(tmp_path / "empty.png") == "zero_byte"
    assert _code(b"") == "zero_byte"
    assert _code(jpeg[: len(jpeg) // 2]) == "truncated"
    png = bytearray(image_bytes(5, size=64))
    png[100:400] = bytes(b ^ 0xFF for b in png[100:400])  # header intact, pixel data scrambled
    assert _code(bytes(png)) == "corrupt"
    assert _code(b"\xff\xd8\xff" + b"\x13garbage" * 20) == "corrupt"  # starts like a JPEG, is not one
    assert _code(b"%PDF-1.7 not an image at all") == "unsupported_format"
    assert _code(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == "unsupported_format"


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    assert _code(png_header(30_000, 30_000)) == "decompression_bomb"  # 900 Mpx: would be 2.7 GB of RGB
    assert _code(png_header(2_000, 1_000), max_pixels=1_000_000) == "decompression_bomb"
    # Pillow's own DecompressionBombWarning is an error too, even under a looser cap of ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert _code(image_bytes(3, size=24)) == "decompression_bomb"  # 576 px > 500: Pillow warns


def test_truncated_images_are_never_loaded_leniently(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        safe_open_image(image_bytes(4))


def test_transparency_goes_on_white_and_exif_orientation_is_applied():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert safe_open_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 0)).save(buf, "JPEG", exif=exif.tobytes())
    assert safe_open_image(buf.getvalue()).size == (20, 40)
