"""Safe image decoding: limits, orientation, every Pillow mode to 8-bit RGB, clear errors."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seemly.images import DecodedImage, ImageError, decode_image, load_image_file, sha256_hex

LIMITS = {"max_pixels": 50_000_000, "max_bytes": 16 * 1024 * 1024}


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def decode(data: bytes, **limits: int) -> DecodedImage:
    return decode_image(data, **{**LIMITS, **limits})


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` 8-bit grey pixels but carries one byte of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + png_chunk(b"IEND", b"")
    )


def noisy_rgb(height: int = 64, width: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# --- the happy path --------------------------------------------------------------------------------
def test_rgb_png_decodes_exactly_with_identity() -> None:
    image = noisy_rgb(5, 7)
    data = encode(image, "PNG")
    decoded = decode(data)
    assert (decoded.width, decoded.height, decoded.format) == (7, 5, "PNG")
    assert decoded.array.shape == (5, 7, 3) and decoded.array.dtype == np.uint8
    assert decoded.array.flags.c_contiguous and not decoded.array.flags.writeable
    np.testing.assert_array_equal(decoded.array, np.asarray(image))
    assert decoded.sha256 == hashlib.sha256(data).hexdigest() == sha256_hex(data)


def test_identity_is_the_bytes_not_the_pixels() -> None:
    image = noisy_rgb(8, 8)
    fast, small = encode(image, "PNG", compress_level=1), encode(image, "PNG", compress_level=9)
    assert fast != small
    assert decode(fast).sha256 != decode(small).sha256
    np.testing.assert_array_equal(decode(fast).array, decode(small).array)
    assert decode(fast).sha256 == decode(bytes(fast)).sha256 == decode(bytearray(fast)).sha256


@pytest.mark.parametrize(
    ("image_format", "options"),
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("PPM", {})],
)
def test_lossless_formats_round_trip(image_format: str, options: dict[str, object]) -> None:
    array = np.zeros((6, 9, 3), np.uint8)
    array[:3] = (255, 0, 0)
    array[3:, 4:] = (0, 0, 255)  # three colours: exact even through GIF's palette
    decoded = decode(encode(Image.fromarray(array), image_format, **options))
    assert decoded.format == image_format
    np.testing.assert_array_equal(decoded.array, array)


# --- modes -----------------------------------------------------------------------------------------
def test_grayscale_and_one_bit() -> None:
    gray = np.array([[0, 100, 255]], np.uint8)
    decoded = decode(encode(Image.fromarray(gray), "PNG"))
    np.testing.assert_array_equal(decoded.array, np.repeat(gray[:, :, None], 3, axis=2))
    bits = Image.fromarray(np.array([[True, False, True]]))
    assert bits.mode == "1"
    np.testing.assert_array_equal(decode(encode(bits, "PNG")).array[0, :, 0], [255, 0, 255])


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 1000, 25700, 65535]], np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # really a 16-bit PNG
    decoded = decode(data)
    # round(v / 257): 0, 0.498, 0.502, 3.89, 100, 255. Clipping would have given 0, 128, 129, 255, 255, 255.
    np.testing.assert_array_equal(decoded.array[0, :, 0], [0, 0, 1, 4, 100, 255])
    assert (decoded.array[..., 0] == decoded.array[..., 2]).all()


def test_sixteen_bit_big_endian_tiff() -> None:
    raw = np.array([[0, 32896, 65535]], ">u2").tobytes()
    image = Image.frombuffer("I;16B", (3, 1), raw, "raw", "I;16B", 0, 1)
    np.testing.assert_array_equal(decode(encode(image, "TIFF")).array[0, :, 0], [0, 128, 255])


def test_thirty_two_bit_integers_outside_sixteen_bits_are_stretched() -> None:
    image = Image.fromarray(np.array([[-50, 0, 205]], np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(decode(encode(image, "TIFF")).array[0, :, 0], [0, 50, 255])
    in_range = Image.fromarray(np.array([[0, 257, 65535]], np.int32))
    np.testing.assert_array_equal(decode(encode(in_range, "TIFF")).array[0, :, 0], [0, 1, 255])


def test_float_images() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(decode(encode(unit, "TIFF")).array[0, :, 0], [0, 128, 255])
    eight_bit = Image.fromarray(np.array([[0.0, 17.4, 200.0]], np.float32))
    np.testing.assert_array_equal(decode(encode(eight_bit, "TIFF")).array[0, :, 0], [0, 17, 200])
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan, 300.0]], np.float32))  # NaN counts as 0
    np.testing.assert_array_equal(decode(encode(wide, "TIFF")).array[0, :, 0], [0, 2, 3, 2, 255])


def test_rgba_is_composited_on_white() -> None:
    rgba = np.array([[(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128), (0, 0, 255, 255)]], np.uint8)
    decoded = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG")).array[0]
    np.testing.assert_array_equal(decoded[0], [255, 0, 0])
    np.testing.assert_array_equal(decoded[1], [255, 255, 255])  # fully transparent: white, not red
    assert np.all(np.abs(decoded[2].astype(int) - 127) <= 1)  # half-transparent black: mid grey
    np.testing.assert_array_equal(decoded[3], [0, 0, 255])


def test_grey_with_alpha() -> None:
    la = Image.fromarray(np.array([[(0, 0), (0, 255), (200, 255)]], np.uint8), "LA")
    np.testing.assert_array_equal(decode(encode(la, "PNG")).array[0, :, 0], [255, 0, 200])


@pytest.mark.parametrize("image_format", ["PNG", "GIF"])
def test_palette_with_transparency(image_format: str) -> None:
    image = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (253 * 3))
    decoded = decode(encode(image, image_format, transparency=1)).array[0]
    np.testing.assert_array_equal(decoded, [[255, 0, 0], [255, 255, 255], [0, 255, 0], [255, 255, 255]])


def test_palette_without_transparency() -> None:
    image = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    np.testing.assert_array_equal(decode(encode(image, "PNG")).array[0], [[255, 0, 0], [0, 0, 255]])


def test_cmyk_jpeg() -> None:
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, 16:] = (255, 0, 0, 0)  # right half pure cyan, left half no ink (white)
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode(data)
    assert decoded.format == "JPEG" and decoded.array.shape == (16, 32, 3)
    assert np.abs(decoded.array[8, 4].astype(int) - (255, 255, 255)).max() <= 8
    assert np.abs(decoded.array[8, 28].astype(int) - (0, 255, 255)).max() <= 8


def test_exif_orientation_is_applied() -> None:
    """Orientation 6 means "rotate 90 degrees clockwise to display": the stored left goes on top."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode(data)
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.array.shape == (40, 20, 3)
    assert np.abs(decoded.array[5, 10].astype(int) - (255, 0, 0)).max() <= 10  # top: red
    assert np.abs(decoded.array[35, 10].astype(int) - (0, 0, 255)).max() <= 10  # bottom: blue


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(decode(data).array[0, 0], [255, 0, 0])


# --- limits ----------------------------------------------------------------------------------------
def test_header_bomb_is_rejected_fast() -> None:
    data = png_header_only(100_000, 100_000)
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"10000000000 pixels, over the limit of 50000000"):
        decode(data)
    assert time.perf_counter() - started < 0.5


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(
        ImageError, match=r"^image is 8000x8000 = 64000000 pixels, over the limit of 50000000$"
    ):
        decode(png_header_only(8000, 8000))  # decoding it would fail: the data is one byte
    data = encode(noisy_rgb(100, 100), "PNG")
    with pytest.raises(ImageError, match=r"^image is 100x100 = 10000 pixels, over the limit of 9999$"):
        decode(data, max_pixels=9999)
    assert decode(data, max_pixels=10000).width == 100


def test_pillow_bomb_warning_never_leaks() -> None:
    """Between Pillow's warning and error thresholds Pillow only warns: seemly raises instead."""
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    data = png_header_only(side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="pixels, over the limit of"):
            decode(data, max_pixels=10**12)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_byte_limit() -> None:
    data = encode(noisy_rgb(16, 16), "PNG")
    with pytest.raises(ImageError, match=rf"^image is {len(data)} bytes, over the limit of 100$"):
        decode(data, max_bytes=100)


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"^image is empty \(0 bytes\)$"),
        (b"hello, this is a text file\nwith two lines\n", r"^not an image \(it looks like text\)$"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "a PDF document; supported formats are PNG, JPEG"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "PostScript/EPS"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG drawing"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(100), "HEIF/AVIF"),
        (bytes(range(256)) * 4, r"^not an image \(unrecognised format; supported formats are"),
    ],
)
def test_not_images(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_formats_outside_the_allow_list_are_refused() -> None:
    ico = encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(ImageError, match="unrecognised format"):
        decode(ico)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF", "TIFF"])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_truncated_images(image_format: str, keep: float) -> None:
    data = encode(noisy_rgb(), image_format)
    with pytest.raises(ImageError, match=r"truncated or corrupt|not an image"):
        decode(data[: int(len(data) * keep)])


def test_truncated_png_and_jpeg_messages() -> None:
    png, jpeg = encode(noisy_rgb(), "PNG"), encode(noisy_rgb(), "JPEG")
    for data in (png[: len(png) // 2], jpeg[: len(jpeg) // 2], jpeg[:200]):
        with pytest.raises(ImageError, match=r"^image is truncated or corrupt: "):
            decode(data)


def test_corrupt_png_data() -> None:
    data = bytearray(encode(noisy_rgb(), "PNG"))
    data[100:110] = b"\xff" * 10  # inside the first IDAT: bad CRC / bad zlib stream
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode(bytes(data))


def test_random_garbage_after_a_real_header_is_an_image_error() -> None:
    header = encode(noisy_rgb(), "PNG")[:33]  # signature + IHDR
    rng = np.random.default_rng(1)
    for _ in range(20):
        with pytest.raises(ImageError):
            decode(header + rng.integers(0, 256, 200, dtype=np.uint8).tobytes())


def test_non_bytes_input() -> None:
    with pytest.raises(ImageError, match="must be bytes, got str"):
        decode_image("image.png", **LIMITS)  # type: ignore[arg-type]


# --- files -----------------------------------------------------------------------------------------
def test_load_image_file(tmp_path: Path) -> None:
    data = encode(noisy_rgb(4, 6), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    decoded = load_image_file(path, **LIMITS)
    assert (decoded.width, decoded.height, decoded.sha256) == (6, 4, sha256_hex(data))
    with pytest.raises(ImageError, match=rf"image.png is {len(data)} bytes, over the limit of 10"):
        load_image_file(path, max_pixels=100, max_bytes=10)
    with pytest.raises(ImageError, match=r"cannot read .*missing\.png"):
        load_image_file(tmp_path / "missing.png", **LIMITS)
