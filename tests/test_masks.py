"""Mask measures and codecs: hand-checked answers, lossless round trips, and bad payloads."""

from __future__ import annotations

import time

import numpy as np
import pytest
import skimage.draw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter import brush as ls_brush
from scipy import ndimage

import seemly.masks as masks_module
from seemly.masks import Mask, MaskError, signed_area

ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def grid(text: str) -> np.ndarray:
    """``"#."`` rows -> boolean array: readable masks for hand-checked tests."""
    return np.array([[char == "#" for char in row] for row in text.split()], dtype=bool)


def checkerboard(height: int, width: int) -> np.ndarray:
    return (np.add.outer(np.arange(height), np.arange(width)) % 2).astype(bool)


def ring_with_hole() -> np.ndarray:
    return grid(
        """
        #####.
        #...#.
        #.#.#.
        #...#.
        #####.
        """
    )


SPECIAL = {
    "empty": np.zeros((5, 7), bool),
    "full": np.ones((5, 7), bool),
    "single pixel image": np.ones((1, 1), bool),
    "empty single pixel": np.zeros((1, 1), bool),
    "row": grid("#.##.#"),
    "column": grid("#.##.#").T.copy(),
    "checkerboard": checkerboard(7, 9),
    "inverse checkerboard": ~checkerboard(6, 5),
    "diagonal": np.eye(6, dtype=bool),
    "anti-diagonal": np.fliplr(np.eye(5, dtype=bool)),
    "hole": ring_with_hole(),
    "island in hole": ~ring_with_hole(),
    "one-pixel lines": grid("#.#.# ##### #...# ##.##"),
    "border frame": np.pad(np.zeros((3, 3), bool), 1, constant_values=True),
    "hole touching outside diagonally": grid("##. #.# ###"),
}

random_masks = arrays(
    dtype=bool,
    shape=st.tuples(st.integers(1, 17), st.integers(1, 17)),
    elements=st.booleans(),
)


# --- construction and measures ---------------------------------------------------------------------
def test_area_bbox_of_a_known_mask() -> None:
    mask = Mask(grid("..... .###. .###. ....."))
    assert mask.shape == (4, 5)
    assert mask.area == 6
    assert mask.bbox == (1, 1, 3, 2)
    assert Mask(grid("#... .... ...#")).bbox == (0, 0, 4, 3)
    assert Mask.empty(3, 4).bbox is None
    assert Mask.empty(3, 4).is_empty and not Mask.full(3, 4).is_empty
    assert Mask.full(3, 4).area == 12


def test_iou_hand_checked() -> None:
    a = Mask(grid("##. ##. ..."))
    b = Mask(grid(".## .## ..."))
    assert a.iou(b) == pytest.approx(2 / 6)
    assert a.iou(a) == 1.0
    assert a.iou(Mask.empty(3, 3)) == 0.0
    assert Mask.empty(3, 3).iou(Mask.empty(3, 3)) == 1.0  # nothing to find, nothing found
    ignore = grid("#.. #.. ...")  # drop a's two private pixels: a & b == a, so IoU = 2 / 4
    assert a.iou(b, ignore=ignore) == pytest.approx(2 / 4)


def test_iou_of_different_shapes_is_an_error() -> None:
    with pytest.raises(MaskError, match="different shapes"):
        Mask.empty(2, 3).iou(Mask.empty(3, 2))


@pytest.mark.parametrize("array", [np.zeros((2, 2, 2)), np.zeros(4), np.zeros((0, 3)), np.zeros((3, 0))])
def test_bad_arrays_are_rejected(array: np.ndarray) -> None:
    with pytest.raises(MaskError):
        Mask(array)


def test_mask_is_immutable_and_hashable() -> None:
    mask = Mask(grid("#. .#"))
    with pytest.raises(ValueError):
        mask.data[0, 0] = False
    assert mask == Mask(grid("#. .#")) and hash(mask) == hash(Mask(grid("#. .#")))
    assert mask != Mask(grid("#. ..")) and mask != "mask"
    assert repr(mask) == "Mask(2x2, area=2)"


# --- COCO RLE ----------------------------------------------------------------------------------------
@ROUND_TRIP
@given(random_masks)
def test_coco_rle_round_trip(array: np.ndarray) -> None:
    mask = Mask(array)
    assert Mask.from_coco_rle(mask.to_coco_rle()) == mask


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_coco_rle_round_trip_special(name: str) -> None:
    mask = Mask(SPECIAL[name])
    rle = mask.to_coco_rle()
    assert rle["size"] == [mask.height, mask.width] and isinstance(rle["counts"], str)
    assert Mask.from_coco_rle(rle) == mask


def test_coco_uncompressed_counts_known_answer() -> None:
    # Column-major runs starting with background: 1 off, 2 on, 3 off on a 2x3 image.
    mask = Mask.from_coco_rle({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask == Mask(grid(".#. #.."))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"counts": "abc"}, "needs 'size'"),
        ({"size": [2, 2]}, "needs 'size'"),
        ({"size": [0, 2], "counts": []}, "must be positive"),
        ({"size": [2, 2], "counts": [1, 2]}, "sum to height"),
        ({"size": [2, 2], "counts": [-1, 5]}, "non-negative"),
        ({"size": [2, 2], "counts": 7}, "string or a list"),
        ("not a dict", "needs 'size'"),
    ],
)
def test_bad_coco_rle(payload: object, message: str) -> None:
    with pytest.raises(MaskError, match=message):
        Mask.from_coco_rle(payload)  # type: ignore[arg-type]


# --- Label Studio brush RLE --------------------------------------------------------------------------
def ls_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    """What Label Studio's own converter (decode_from_annotation) reads from a brush result."""
    layers = ls_brush.decode_from_annotation(
        "tag",
        [
            {
                "type": "brushlabels",
                "rle": rle,
                "original_width": width,
                "original_height": height,
                "brushlabels": ["x"],
            }
        ],
    )
    (layer,) = layers.values()
    return layer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_masks)
def test_ls_brush_round_trip_and_label_studio_reads_it(array: np.ndarray) -> None:
    mask = Mask(array)
    rle = mask.to_ls_brush_rle()
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    assert Mask.from_ls_brush_rle(rle, mask.height, mask.width) == mask
    np.testing.assert_array_equal(ls_decode(rle, mask.height, mask.width), array.astype(np.uint8) * 255)


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_ls_brush_round_trip_special(name: str) -> None:
    mask = Mask(SPECIAL[name])
    assert Mask.from_ls_brush_rle(mask.to_ls_brush_rle(), mask.height, mask.width) == mask


def test_ls_brush_reads_label_studio_encodings_by_alpha() -> None:
    """Label Studio's editor paints coloured RGBA; the converter keys on alpha, and so do we."""
    expected = grid(".#. ##. ..#")
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[expected] = (12, 200, 77, 128)  # a label colour, half transparent
    rgba[~expected, :3] = 255  # colour without alpha is not paint
    rle = ls_brush.encode_rle(rgba.ravel())
    assert Mask.from_ls_brush_rle(rle, 3, 3) == Mask(expected)
    assert Mask.from_ls_brush_rle(bytes(rle), 3, 3) == Mask(expected)  # bytes are accepted too
    assert Mask.from_ls_brush_rle(ls_brush.mask2rle(expected.astype(np.uint8)), 3, 3) == Mask(expected)


def test_ls_brush_large_runs() -> None:
    """Runs longer than 2**16 values take the encoder's multi-chunk path."""
    mask = Mask(np.zeros((300, 400), bool))
    assert Mask.from_ls_brush_rle(mask.to_ls_brush_rle(), 300, 400) == mask
    full = Mask.full(300, 400)
    assert Mask.from_ls_brush_rle(full.to_ls_brush_rle(), 300, 400) == full


def test_ls_brush_wrong_size_names_both_sizes() -> None:
    rle = Mask.full(4, 5).to_ls_brush_rle()  # 4 high, 5 wide: 80 RGBA values
    with pytest.raises(MaskError, match=r"holds 80 values but a 5x5 RGBA image needs 100"):
        Mask.from_ls_brush_rle(rle, 5, 5)
    with pytest.raises(MaskError, match=r"holds 80 values but a 6x5 RGBA image needs 120"):
        Mask.from_ls_brush_rle(rle, 5, 6)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "shorter than its 7-byte header"),
        ([0, 0, 0], "shorter than its 7-byte header"),
        ([1, 2, 300, 4, 5, 6, 7, 8], "integers 0..255"),
        ([0, 0, 0, -1, 0, 0, 0], "integers 0..255"),
        ([0.5] * 10, "integers 0..255"),
        ("0,0,0,80", "list of integers"),
        ({"rle": [1]}, "list of integers"),
        (80, "list of integers"),
        (None, "list of integers"),
        ([255] * 40, "holds"),  # header claims 4294967295 values: refused before allocating
    ],
)
def test_bad_ls_brush_payloads(payload: object, message: str) -> None:
    with pytest.raises(MaskError, match=message):
        Mask.from_ls_brush_rle(payload, 4, 5)  # type: ignore[arg-type]


def test_truncated_and_garbage_ls_brush_bodies() -> None:
    rle = Mask(checkerboard(4, 5)).to_ls_brush_rle()
    with pytest.raises(MaskError, match="corrupt Label Studio brush RLE"):
        Mask.from_ls_brush_rle(rle[:9], 4, 5)
    rng = np.random.default_rng(7)
    header = rle[:4]
    for _ in range(50):  # a valid header, random body: a MaskError or some mask, never another error
        body = rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist()
        try:
            decoded = Mask.from_ls_brush_rle(header + body, 4, 5)
        except MaskError:
            continue
        assert decoded.shape == (4, 5)


def test_ls_brush_rejects_oversized_payload_and_bad_size() -> None:
    rle = Mask.full(2, 2).to_ls_brush_rle()
    with pytest.raises(MaskError, match="longer than any encoding"):
        Mask.from_ls_brush_rle(rle + [0] * 1000, 2, 2)
    with pytest.raises(MaskError, match="positive integers"):
        Mask.from_ls_brush_rle(rle, 0, 2)
    with pytest.raises(MaskError, match="positive integers"):
        Mask.from_ls_brush_rle(rle, 2.0, 2)  # type: ignore[arg-type]
    with pytest.raises(MaskError, match="positive integers"):
        Mask.from_ls_brush_rle(rle, True, 2)
    assert Mask.from_ls_brush_rle(rle, np.int64(2), np.int64(2)) == Mask.full(2, 2)


# --- polygons ----------------------------------------------------------------------------------------
@ROUND_TRIP
@given(random_masks)
def test_polygon_round_trip(array: np.ndarray) -> None:
    mask = Mask(array)
    polygons = mask.to_polygons()
    assert Mask.from_polygons(polygons, mask.height, mask.width) == mask
    # Every ring is closed on pixel corners with no collinear vertices: at least 4, all turns.
    for ring in polygons:
        assert len(ring) >= 4 and len(ring) % 2 == 0
        assert all(float(v).is_integer() for point in ring for v in point)
    # The signed areas add up to the pixel count (outer rings positive, holes negative).
    assert sum(signed_area(ring) for ring in polygons) == pytest.approx(mask.area)


@ROUND_TRIP
@given(random_masks)
def test_ls_percent_polygon_round_trip(array: np.ndarray) -> None:
    mask = Mask(array)
    percent = mask.to_ls_polygons_percent()
    assert all(0.0 <= v <= 100.0 for ring in percent for point in ring for v in point)
    assert Mask.from_ls_polygons_percent(percent, mask.height, mask.width) == mask


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_polygon_round_trip_special(name: str) -> None:
    mask = Mask(SPECIAL[name])
    assert Mask.from_polygons(mask.to_polygons(), mask.height, mask.width) == mask


def test_polygons_known_answers() -> None:
    assert Mask.empty(3, 3).to_polygons() == []
    assert Mask.full(2, 3).to_polygons() == [[(0.0, 0.0), (3.0, 0.0), (3.0, 2.0), (0.0, 2.0)]]
    single = Mask(grid("... .#. ..."))
    assert single.to_polygons() == [[(1.0, 1.0), (2.0, 1.0), (2.0, 2.0), (1.0, 2.0)]]
    # An L shape: six corners, the collinear ones along the long sides dropped.
    ell = Mask(grid("#.. #.. ###"))
    assert ell.to_polygons() == [[(0.0, 0.0), (1.0, 0.0), (1.0, 2.0), (3.0, 2.0), (3.0, 3.0), (0.0, 3.0)]]


def test_hole_is_a_negative_ring() -> None:
    polygons = Mask(grid("### #.# ###")).to_polygons()
    assert polygons == [
        [(0.0, 0.0), (3.0, 0.0), (3.0, 3.0), (0.0, 3.0)],
        [(2.0, 1.0), (1.0, 1.0), (1.0, 2.0), (2.0, 2.0)],
    ]
    assert [signed_area(ring) for ring in polygons] == [9.0, -1.0]


def test_diagonal_pixels_are_separate_rings_sharing_a_corner() -> None:
    polygons = Mask(grid("#. .#")).to_polygons()
    assert polygons == [
        [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
        [(1.0, 1.0), (2.0, 1.0), (2.0, 2.0), (1.0, 2.0)],
    ]


def test_user_polygon_fill_known_answer() -> None:
    # A triangle with non-integer vertices: pixels whose centres are inside it.
    # The slanted side crosses the row centres y = 0.5, 1.5, 2.5, 3.5 at x = 4.41, 3.17, 1.93, 0.69.
    triangle = [(0.2, 0.1), (4.9, 0.1), (0.2, 3.9)]
    expected = grid("####. ###.. ##... #....")
    assert Mask.from_polygons([triangle], 4, 5) == Mask(expected)
    # A box from (1, 1) to (3, 2) covers exactly pixels (row 1, cols 1..2).
    assert Mask.from_polygons([[(1, 1), (3, 1), (3, 2), (1, 2)]], 3, 4) == Mask(grid(".... .##. ...."))
    # Repeating the first point (closed ring) and orientation change nothing.
    closed = [(3, 2), (3, 1), (1, 1), (1, 2), (3, 2)]
    assert Mask.from_polygons([closed], 3, 4) == Mask(grid(".... .##. ...."))


def test_polygon_fill_is_even_odd_and_clipped() -> None:
    outer = [(-5.0, -5.0), (20.0, -5.0), (20.0, 20.0), (-5.0, 20.0)]  # beyond the image on all sides
    inner = [(1.0, 1.0), (3.0, 1.0), (3.0, 3.0), (1.0, 3.0)]
    filled = Mask.from_polygons([outer, inner], 4, 4)
    assert filled == Mask(grid("#### #..# #..# ####"))
    assert Mask.from_polygons([[(10, 10), (12, 10), (12, 12)]], 4, 4).is_empty
    assert Mask.from_polygons([], 2, 2).is_empty


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_polygon_fill_matches_skimage_on_random_polygons(seed: int) -> None:
    """Arbitrary (self-intersecting, partly outside) user polygons: same pixels as skimage's
    even-odd ``draw.polygon`` evaluated at pixel centres."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 25, size=2))
    count = int(rng.integers(3, 9))
    points = np.c_[rng.uniform(-3, width + 3, count), rng.uniform(-3, height + 3, count)]
    expected = np.zeros((height, width), bool)
    rows, cols = skimage.draw.polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, (height, width))
    expected[rows, cols] = True
    assert Mask.from_polygons([points.tolist()], height, width) == Mask(expected)


def test_polygon_fill_in_chunks_gives_the_same_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    array = ndimage.binary_opening(np.random.default_rng(3).random((60, 80)) < 0.6)
    polygons = Mask(array).to_polygons()
    monkeypatch.setattr(masks_module, "_ROWS_PER_CHUNK", 7)
    assert Mask.from_polygons(polygons, 60, 80) == Mask(array)


@pytest.mark.parametrize(
    ("polygons", "message"),
    [
        ([[(0, 0), (1, 1)]], "polygon 0 needs at least 3 points, got 2"),
        ([[(0, 0), (1, 1), (1, 0)], []], "polygon 1"),
        ([[(0, 0), (1, float("nan")), (1, 0)]], "not a finite number"),
        ([[(0, 0), (1, float("inf")), (1, 0)]], "not a finite number"),
        ([[0, 0, 1, 1, 1, 0]], r"\(x, y\) pairs"),
        ([[(0, 0, 1), (1, 1, 1), (1, 0, 1)]], r"\(x, y\) pairs"),
        ([[("a", "b"), (1, 1), (1, 0)]], "number pairs"),
        ("polygon", "list of rings"),
        (None, "list of rings"),
    ],
)
def test_bad_polygons(polygons: object, message: str) -> None:
    with pytest.raises(MaskError, match=message):
        Mask.from_polygons(polygons, 4, 4)  # type: ignore[arg-type]


def test_bad_polygon_image_size() -> None:
    with pytest.raises(MaskError, match="positive integers"):
        Mask.from_polygons([[(0, 0), (1, 0), (1, 1)]], 0, 4)
    with pytest.raises(MaskError, match="positive integers"):
        Mask.from_ls_polygons_percent([[(0, 0), (1, 0), (1, 1)]], 4, -1)


def test_percent_coordinates_known_answer() -> None:
    mask = Mask(grid(".... .##. ...."))  # pixels (1, 1), (1, 2) of a 4 wide, 3 high image
    assert mask.to_ls_polygons_percent() == [
        [[25.0, 100 / 3], [75.0, 100 / 3], [75.0, 200 / 3], [25.0, 200 / 3]],
    ]
    drawn = [[25.0, 100 / 3], [75.0, 100 / 3], [75.0, 200 / 3], [25.0, 200 / 3]]
    assert Mask.from_ls_polygons_percent([drawn], 3, 4) == mask


def test_signed_area() -> None:
    assert signed_area([(0, 0), (2, 0), (2, 3), (0, 3)]) == 6.0
    assert signed_area([(0, 0), (0, 3), (2, 3), (2, 0)]) == -6.0


def test_tracing_a_large_complex_mask_is_fast() -> None:
    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((1000, 1000)), 2) > 0.5  # thousands of wiggly rings
    mask = Mask(blobs)
    mask.to_polygons()  # warm-up (imports, caches)
    started = time.perf_counter()
    polygons = mask.to_polygons()
    elapsed = time.perf_counter() - started
    assert len(polygons) > 1000
    assert elapsed < 1.0, f"tracing took {elapsed:.2f}s"
    assert Mask.from_polygons(polygons, 1000, 1000) == mask


def test_a_mask_neither_freezes_nor_follows_the_callers_array() -> None:
    source = np.zeros((4, 5), dtype=bool)
    mask = Mask(source)
    source[0, 0] = True  # still writable
    assert mask.area == 0  # and the mask kept its own copy
    with pytest.raises(ValueError):
        mask.data[1, 1] = True
