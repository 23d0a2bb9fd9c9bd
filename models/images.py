"""Guarded image decoding: one image from a path or bytes, or a failure with a status code.

Every image that reaches an image encoder goes through :func:`safe_open_image`, at encode
time and at query time, so a catalog image and a query image are decoded the same way:

1. empty input -> ``zero_byte``; a path that does not exist -> ``missing``; a path that is not a
   regular file (a FIFO, socket or device, which could block forever) is never read -> ``unreadable``;
2. only the formats in :data:`ALLOWED_FORMATS` are parsed; bytes that carry none of their
   signatures -> ``unsupported_format``, bytes that carry one but do not parse -> ``corrupt``;
3. the header's width x height is checked against ``max_pixels`` before any pixel is decoded,
   and Pillow's ``DecompressionBombWarning`` is raised as an error -> ``decompression_bomb``;
4. truncated data is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False) -> ``truncated``;
5. the EXIF orientation is applied and transparency is composited onto white -> RGB.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # width x height above this is treated as a decompression bomb

Image.init()
_WANTED = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")
ALLOWED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED if f in Image.OPEN)  # the only formats parsed

# leading bytes of the allowed formats: a file that starts like one of these but does not parse is corrupt
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# the failure codes :class:`ImageDecodeError` carries
IMAGE_FAILURES = ("missing", "unreadable", "zero_byte", "unsupported_format", "corrupt", "truncated", "decompression_bomb")


class ImageDecodeError(ValueError):
    """An image cannot be used; ``code`` is one of :data:`IMAGE_FAILURES`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def safe_open_image(source: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                    reduce_to: int | None = None) -> Image.Image:
    """Decode one image from ``bytes`` or a file path into a fully loaded RGB ``PIL.Image``.

    With ``reduce_to`` (pixels), a larger image is decoded reduced by an integer factor that
    keeps its shorter side at least ``reduce_to``: JPEG at a smaller DCT scale (Pillow's
    ``draft``, the full-size pixels never exist), other formats decoded and then box-reduced.
    Raises :class:`ImageDecodeError` (with ``.code``) for every way an image can be unusable.
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else read_image_file(source)
    if not data:
        raise ImageDecodeError("zero_byte", "image is empty (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; clearrec refuses to decode truncated images")
    # catch_warnings is process-wide, so decoding threads can interleave it; the header check in
    # _open is what guarantees the cap (Pillow warns only above its own MAX_IMAGE_PIXELS anyway)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        try:
            if reduce_to is not None and min(img.size) >= 2 * reduce_to:
                img.draft(img.mode, (reduce_to, reduce_to))  # JPEG only: the smallest DCT scale >= reduce_to
            img.load()
            if reduce_to is not None and min(img.size) >= 2 * reduce_to:
                img = _to_rgb(img).reduce(min(img.size) // reduce_to)
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError("decompression_bomb", str(e)) from e
        except OSError as e:
            code = "truncated" if "truncated" in str(e).lower() else "corrupt"
            raise ImageDecodeError(code, f"cannot decode {img.format} image: {e}") from e
        except (ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError) as e:
            raise ImageDecodeError("corrupt", f"cannot decode {img.format} image: {type(e).__name__}: {e}") from e
    return _to_rgb(img)


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file. A FIFO, socket or device is never read (it could block forever):
    it is opened non-blocking and refused after ``fstat``. Raises :class:`ImageDecodeError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise ImageDecodeError("missing", f"image file not found: {path}") from e
    except IsADirectoryError as e:
        raise ImageDecodeError("missing", f"image path is a folder, not a file: {path}") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageDecodeError("unreadable", f"cannot read {path}: {e}") from e
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageDecodeError("missing", f"image path is a folder, not a file: {path}")
        if not stat.S_ISREG(mode):
            raise ImageDecodeError("unreadable", f"{path} is not a regular file ({_file_kind(mode)}); it is not read")
        try:
            data = f.read()
        except OSError as e:
            raise ImageDecodeError("unreadable", f"cannot read {path}: {e}") from e
    if not data:
        raise ImageDecodeError("zero_byte", f"image file is empty (0 bytes): {path}")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (no pixel decoding) and apply the pixel cap."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("decompression_bomb", str(e)) from e
    except (UnidentifiedImageError, KeyError) as e:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageDecodeError("corrupt", "image header does not parse") from e
        raise ImageDecodeError(
            "unsupported_format", f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        code = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageDecodeError(code, f"image header does not parse: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels}"
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB image; transparent pixels are composited onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")
