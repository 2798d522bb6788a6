"""Safe image decoding: untrusted bytes in, an ``H x W x 3`` uint8 RGB array out.

Every image seemly segments passes through :func:`decode_image`, so the rules live here once:

* limits first: the byte size before parsing, the pixel count from the header before decoding;
* a fixed list of common raster formats (not EPS, whose Pillow plugin runs Ghostscript, nor the
  rarely used parsers);
* EXIF orientation applied, because browsers (and so Label Studio) show images upright and masks
  must line up with what the annotator sees; width and height are those of the upright image;
* every mode normalised to 8-bit RGB: transparency is composited on white (what most viewers show;
  the colour of a transparent pixel is arbitrary), 16-bit images are scaled (v / 257) rather than
  clipped, other integer and float ranges are mapped onto 0..255 (see ``_scale_int``,
  ``_scale_float``); ICC profiles are ignored; multi-frame files give their first frame.

Any failure is an :class:`ImageError` (a ``ValueError``) whose message says what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG includes MPO (phone cameras)
# Recognisable non-image (or not supported) payloads, for a better message than "unrecognised".
_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"%!PS", "a PostScript/EPS file"),
    (b"\xc5\xd0\xd3\xc6", "a PostScript/EPS file"),
    (b"8BPS", "a Photoshop PSD file"),
    (b"PK\x03\x04", "a ZIP archive"),
)


class ImageError(ValueError):
    """The bytes are not an image seemly can decode within its limits."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded, upright image. ``array`` is read-only so that cached images cannot be altered."""

    array: np.ndarray  # (height, width, 3) uint8 RGB, C-contiguous
    sha256: str  # hex digest of the original bytes: the image's identity
    width: int
    height: int
    format: str  # Pillow's format name: "PNG", "JPEG", ...


def sha256_hex(data: bytes) -> str:
    """The image identity: hex sha256 of the raw bytes."""
    return hashlib.sha256(data).hexdigest()


def load_image_file(path: str | Path, *, max_pixels: int, max_bytes: int) -> DecodedImage:
    """Read and decode a local file, refusing an oversized one before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{path} is {size} bytes, over the limit of {max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int) -> DecodedImage:
    """Decode untrusted bytes into an upright 8-bit RGB image (see the module docstring)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    with _pillow_errors(max_pixels):
        image = _open(data, max_pixels)
        with image:
            image_format = image.format or "unknown"
            image.load()
            array = _to_rgb(_upright(image))
    array = np.ascontiguousarray(array, dtype=np.uint8)
    array.setflags(write=False)
    height, width = array.shape[:2]
    return DecodedImage(array=array, sha256=sha256_hex(data), width=width, height=height, format=image_format)


@contextmanager
def _pillow_errors(max_pixels: int) -> Iterator[None]:
    """Turn whatever Pillow raises into an :class:`ImageError`.

    Pillow's process-wide guard (``Image.MAX_IMAGE_PIXELS``) stays on as a backstop behind our
    limit; its warning is made an error here so that it surfaces as an ImageError, never as a
    warning. (``catch_warnings`` is process-global: a racing thread may briefly see the same
    filter, which only makes it stricter in the same way.)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(exc, max_pixels) from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise ImageError(f"image is truncated or corrupt: {exc}") from exc


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse only the header and enforce the pixel limit before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not an image ({_describe(data)})") from None
    width, height = image.size
    try:
        if width < 1 or height < 1:
            raise ImageError(f"image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
            )
    except ImageError:
        image.close()
        raise
    return image


def _too_large(exc: Exception, max_pixels: int) -> ImageError:
    """Pillow's backstop fired: word it like our own limit."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if found:
        return ImageError(f"image has {found.group(1)} pixels, over the limit of {limit}")
    return ImageError(f"image is over the limit of {limit} pixels")


def _describe(data: bytes) -> str:
    for prefix, what in _SIGNATURES:
        if data.startswith(prefix):
            return f"{what}; supported formats are {', '.join(FORMATS)}"
    head = data[:1024]
    if b"<svg" in head.lower():
        return f"an SVG drawing; supported formats are {', '.join(FORMATS)}"
    if b"ftyp" in head[4:12]:
        return f"a HEIF/AVIF/MP4 container; supported formats are {', '.join(FORMATS)}"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised format; supported formats are {', '.join(FORMATS)}"
    return "it looks like text"


def _upright(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError):
        return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in {"1", "L"}:
        return _gray(np.asarray(image.convert("L")))
    if mode.startswith("I;16") or mode == "I":
        return _gray(_scale_int(np.asarray(image)))
    if mode == "F":
        return _gray(_scale_float(np.asarray(image)))
    if mode in {"LA", "La", "PA", "RGBA", "RGBa"} or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as exc:
        raise ImageError(f"unsupported image mode {mode!r}: {exc}") from exc


def _gray(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scale_int(values: np.ndarray) -> np.ndarray:
    """16-bit (or wider) integers -> 8 bits: 0..65535 maps to 0..255 by rounding (x / 257);
    values outside that range (signed or 32-bit data) are stretched from their min..max."""
    values = values.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low >= 0 and high <= 65535:
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    return _stretch(values.astype(np.float64), low, high)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Float images: 0..1 maps to 0..255, data already in 0..255 is kept, any other range is
    stretched; NaN and infinities count as 0."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _stretch(values, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * 255.0 / (high - low)).astype(np.uint8)
