"""Binary masks and their wire formats.

A :class:`Mask` is an immutable ``H x W`` boolean array with the measures every part of seemly
needs (area, bbox, IoU). Codecs convert it losslessly to and from the formats that cross our
boundaries: COCO RLE (database, COCO export), Label Studio brush RLE (the ML backend's answers),
and polygons (Label Studio PolygonLabels).

Polygons use continuous pixel coordinates: pixel ``(row r, column c)`` covers
``[c, c+1) x [r, r+1)``. Traced polygons run along pixel edges (vertices on pixel corners) and are
filled back with the even-odd rule at pixel centres, which makes mask -> polygons -> mask exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

Ring = list[tuple[float, float]]


class MaskError(ValueError):
    """A mask payload that cannot be decoded or does not fit the image."""


@dataclass(frozen=True, eq=False)
class Mask:
    """An immutable boolean mask of shape ``(height, width)``."""

    data: np.ndarray

    def __post_init__(self) -> None:
        array = np.asarray(self.data)
        if array.ndim != 2:
            raise MaskError(f"a mask must be 2-D, got shape {array.shape}")
        if array.shape[0] < 1 or array.shape[1] < 1:
            raise MaskError(f"a mask must have a positive size, got shape {array.shape}")
        array = np.ascontiguousarray(array.astype(bool, copy=False))
        if array.flags.writeable and np.shares_memory(array, np.asarray(self.data)):
            # the caller's own array: copy it, so the mask cannot change under us and the
            # caller's array stays writable
            array = array.copy()
        array.setflags(write=False)
        object.__setattr__(self, "data", array)

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def empty(cls, height: int, width: int) -> Mask:
        return cls(np.zeros((height, width), dtype=bool))

    @classmethod
    def full(cls, height: int, width: int) -> Mask:
        return cls(np.ones((height, width), dtype=bool))

    # --- measures -----------------------------------------------------------------------------
    @property
    def height(self) -> int:
        return int(self.data.shape[0])

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.data))

    @property
    def is_empty(self) -> bool:
        return not self.data.any()

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """``(x, y, w, h)`` of the tight pixel box (COCO convention), ``None`` when empty."""
        rows = np.flatnonzero(self.data.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(self.data.any(axis=0))
        y0, y1 = int(rows[0]), int(rows[-1])
        x0, x1 = int(cols[0]), int(cols[-1])
        return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)

    def iou(self, other: Mask, ignore: np.ndarray | None = None) -> float:
        """Intersection over union; two empty masks agree perfectly (1.0).

        ``ignore`` marks pixels left out of both counts (the GrabCut boundary band).
        """
        if other.shape != self.shape:
            raise MaskError(f"IoU of masks of different shapes {self.shape} and {other.shape}")
        a, b = self.data, other.data
        if ignore is not None:
            keep = ~np.asarray(ignore, dtype=bool)
            a, b = a & keep, b & keep
        union = np.count_nonzero(a | b)
        if union == 0:
            return 1.0
        return float(np.count_nonzero(a & b) / union)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Mask)
            and other.shape == self.shape
            and bool(np.array_equal(self.data, other.data))
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.data.tobytes()))

    def __repr__(self) -> str:
        return f"Mask({self.height}x{self.width}, area={self.area})"

    # --- COCO RLE -----------------------------------------------------------------------------
    def to_coco_rle(self) -> dict[str, Any]:
        """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` (JSON-safe)."""
        rle = coco_mask.encode(np.asfortranarray(self.data.astype(np.uint8)))
        return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}

    @classmethod
    def from_coco_rle(cls, rle: dict[str, Any]) -> Mask:
        """Decode compressed (string counts) or uncompressed (list counts) COCO RLE."""
        try:
            height, width = (int(v) for v in rle["size"])
            counts = rle["counts"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MaskError("COCO RLE needs 'size': [height, width] and 'counts'") from exc
        if height < 1 or width < 1:
            raise MaskError(f"COCO RLE size must be positive, got {[height, width]}")
        if isinstance(counts, list):
            if any((not isinstance(c, int)) or c < 0 for c in counts) or sum(counts) != height * width:
                raise MaskError("uncompressed COCO RLE counts must be non-negative and sum to height*width")
            encoded = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, str | bytes):
            encoded = {
                "size": [height, width],
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
        else:
            raise MaskError("COCO RLE 'counts' must be a string or a list of integers")
        try:
            decoded = coco_mask.decode(encoded)
        except Exception as exc:  # pycocotools raises bare exceptions on corrupt counts
            raise MaskError(f"corrupt COCO RLE counts: {exc}") from exc
        if decoded.shape != (height, width):
            raise MaskError("COCO RLE counts do not match its size")
        return cls(decoded.astype(bool))

    # --- Label Studio brush RLE ---------------------------------------------------------------
    def to_ls_brush_rle(self) -> list[int]:
        """Label Studio ``BrushLabels`` RLE: the mask as an RGBA image (every channel 255 on the object)."""
        if self.height * self.width * 4 >= 2**32:
            raise MaskError(f"a {self.height}x{self.width} mask is too large for Label Studio brush RLE")
        return [int(v) for v in _ls_brush().mask2rle(self.data.astype(np.uint8) * 255)]

    @classmethod
    def from_ls_brush_rle(cls, rle: Sequence[int] | bytes, height: int, width: int) -> Mask:
        """Decode Label Studio brush RLE as Label Studio's own converter does: alpha channel > 0."""
        data = _brush_bytes(rle, height, width)
        try:
            flat = _ls_brush().decode_rle(data)
            alpha = np.reshape(flat, (height, width, 4))[:, :, 3]
        except Exception as exc:  # the LS decoder fails with ValueError/OverflowError on garbage
            raise MaskError(f"corrupt Label Studio brush RLE: {exc}") from exc
        return cls(alpha > 0)

    # --- polygons -----------------------------------------------------------------------------
    def to_polygons(self) -> list[Ring]:
        """Exact boundary rings ``[(x, y), ...]`` on pixel corners, collinear vertices removed.

        Outer rings run clockwise on screen (positive :func:`signed_area`), holes the other way.
        Diagonally touching pixels belong to separate rings that share a corner. Filling the rings
        with :meth:`from_polygons` gives this mask back exactly.
        """
        vertices, bounds = _trace_boundary(self.data)
        coords = vertices.astype(float)
        points = list(zip(coords[:, 0].tolist(), coords[:, 1].tolist(), strict=True))
        return [points[start:stop] for start, stop in pairwise(bounds)]

    @classmethod
    def from_polygons(cls, polygons: Sequence[Sequence[Sequence[float]]], height: int, width: int) -> Mask:
        """Rasterise rings with the even-odd rule: a pixel is set when its centre is inside an odd
        number of rings. Vertices may be anywhere (non-integer, outside the image)."""
        _check_size(height, width)
        return cls(_fill_even_odd(_as_rings(polygons), height, width))

    def to_ls_polygons_percent(self) -> list[list[list[float]]]:
        """:meth:`to_polygons` in Label Studio's ``points`` format: ``[[x%, y%], ...]`` per ring."""
        vertices, bounds = _trace_boundary(self.data)
        points = (vertices * 100.0 / np.array([self.width, self.height])).tolist()
        return [points[start:stop] for start, stop in pairwise(bounds)]

    @classmethod
    def from_ls_polygons_percent(
        cls, polygons: Sequence[Sequence[Sequence[float]]], height: int, width: int
    ) -> Mask:
        """Inverse of :meth:`to_ls_polygons_percent` (also fills polygons drawn in Label Studio)."""
        _check_size(height, width)
        size = np.array([width, height], dtype=float)
        return cls(_fill_even_odd([ring * size / 100.0 for ring in _as_rings(polygons)], height, width))


def _ls_brush() -> Any:
    """Label Studio's brush codec, imported on first use: ``label_studio_sdk.converter`` pulls in nltk
    and scipy.stats (~2.5 s), which every Ray worker that only needs COCO RLE would pay at start."""
    from label_studio_sdk.converter import brush

    return brush


def signed_area(ring: Sequence[Sequence[float]]) -> float:
    """Shoelace area in image coordinates (y down): positive for outer rings, negative for holes."""
    points = np.asarray(ring, dtype=float).reshape(-1, 2)
    x, y = points[:, 0], points[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0


# --- helpers ------------------------------------------------------------------------------------
_LS_HEADER_BYTES = 7  # 32-bit value count, 5-bit word size, four 4-bit run sizes
_LS_MAX_BITS_PER_VALUE = 1 + 2 + 16 + 32  # the costliest encoding of one value the format allows


def _check_size(height: int, width: int) -> None:
    integers = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (height, width))
    if not integers or height < 1 or width < 1:
        raise MaskError(f"mask size must be positive integers, got height={height!r} width={width!r}")


def _brush_bytes(rle: Sequence[int] | bytes, height: int, width: int) -> bytes:
    """Validate a brush RLE payload before the (pure Python, unguarded) LS decoder sees it."""
    _check_size(height, width)
    if isinstance(rle, np.ndarray):
        rle = rle.tolist()
    if not isinstance(rle, list | tuple | bytes | bytearray):
        raise MaskError(f"brush RLE must be a list of integers 0..255, got {type(rle).__name__}")
    try:
        data = bytes(rle)
    except (TypeError, ValueError) as exc:
        raise MaskError(f"brush RLE must be a list of integers 0..255: {exc}") from exc
    if len(data) < _LS_HEADER_BYTES:
        raise MaskError(f"brush RLE is {len(data)} bytes, shorter than its {_LS_HEADER_BYTES}-byte header")
    expected = height * width * 4
    count = int.from_bytes(data[:4], "big")
    if count != expected:
        raise MaskError(
            f"brush RLE holds {count} values but a {width}x{height} RGBA image needs {expected}"
            " (wrong image size, or not brush RLE)"
        )
    if (len(data) - 1) * 8 > _LS_HEADER_BYTES * 8 + _LS_MAX_BITS_PER_VALUE * expected:
        raise MaskError(
            f"brush RLE is {len(data)} bytes, longer than any encoding of a {width}x{height} mask"
        )
    return data


def _as_rings(polygons: Sequence[Sequence[Sequence[float]]]) -> list[np.ndarray]:
    """Validate user polygons into ``(n, 2)`` float arrays."""
    if isinstance(polygons, str | bytes) or not isinstance(polygons, Sequence | np.ndarray):
        raise MaskError("polygons must be a list of rings, each a list of (x, y) points")
    rings = []
    for index, ring in enumerate(polygons):
        try:
            points = np.asarray(ring, dtype=float)
        except (TypeError, ValueError) as exc:
            raise MaskError(f"polygon {index}: points must be (x, y) number pairs ({exc})") from exc
        if points.ndim != 2 or points.shape[1] != 2:
            raise MaskError(
                f"polygon {index}: points must be (x, y) pairs, got an array of shape {points.shape}"
            )
        if points.shape[0] < 3:
            raise MaskError(f"polygon {index} needs at least 3 points, got {points.shape[0]}")
        if not np.isfinite(points).all():
            raise MaskError(f"polygon {index} has a coordinate that is not a finite number")
        rings.append(points)
    return rings


# Directions of a boundary edge: 0 = +x, 1 = +y, 2 = -x, 3 = -y (y points down); turning right is d + 1.
_DX = np.array([1, 0, -1, 0], dtype=np.int64)
_DY = np.array([0, 1, 0, -1], dtype=np.int64)
# The two pixels ahead of a corner reached in direction d, as (dy, dx) offsets into the padded mask
# from P[cy, cx] (the pixels around corner (cx, cy) are P[cy:cy + 2, cx:cx + 2]).
_AHEAD_LEFT = (np.array([0, 1, 1, 0]), np.array([1, 1, 0, 0]))
_AHEAD_RIGHT = (np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1]))


def _trace_boundary(data: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Boundary rings of a boolean image: ``(n, 2)`` int corners ``(x, y)`` and ring bounds
    (ring ``i`` is ``vertices[bounds[i]:bounds[i + 1]]``).

    Every pixel edge between object and background becomes a directed edge with the object on its
    right. At the end of each edge the walk turns right when the pixel ahead-right is background,
    goes straight when only it is object, and turns left otherwise; so diagonally touching object
    pixels end up in separate rings. "Next edge" is then a permutation whose cycles are the rings:
    found with connected components and put in order by pointer jumping, all vectorised.
    """
    height, width = data.shape
    padded = np.zeros((height + 2, width + 2), dtype=bool)
    padded[1:-1, 1:-1] = data
    above, below = padded[:-1, 1:-1], padded[1:, 1:-1]  # horizontal edges: y = r, x in [c, c+1]
    hy, hx = np.nonzero(above != below)
    left, right = padded[1:-1, :-1], padded[1:-1, 1:]  # vertical edges: x = c, y in [r, r+1]
    vy, vx = np.nonzero(left != right)
    h_east, v_south = below[hy, hx], left[vy, vx]
    count = hy.size + vy.size
    if count == 0:
        return np.zeros((0, 2), dtype=np.int64), [0]
    # Edges are numbered by grid position (horizontal ones first), so ``grid_id`` is sorted.
    h_edges = (height + 1) * width
    grid_id = np.concatenate([hy * width + hx, h_edges + vy * (width + 1) + vx]).astype(np.int64)
    sx = np.concatenate([hx + ~h_east, vx]).astype(np.int64)
    sy = np.concatenate([hy, vy + ~v_south]).astype(np.int64)
    direction = np.concatenate([np.where(h_east, 0, 2), np.where(v_south, 1, 3)]).astype(np.int64)

    cx, cy = sx + _DX[direction], sy + _DY[direction]  # where each edge ends
    ahead_left = padded[cy + _AHEAD_LEFT[0][direction], cx + _AHEAD_LEFT[1][direction]]
    ahead_right = padded[cy + _AHEAD_RIGHT[0][direction], cx + _AHEAD_RIGHT[1][direction]]
    turn = np.where(~ahead_right, 1, np.where(ahead_left, 3, 0))
    out = (direction + turn) % 4
    wanted = np.where(
        out % 2 == 0,
        cy * width + cx - (out == 2),
        h_edges + (cy - (out == 3)) * (width + 1) + cx,
    )
    nxt = np.searchsorted(grid_id, wanted)

    index = np.arange(count)
    graph = csr_matrix((np.ones(count, dtype=np.int8), (index, nxt)), shape=(count, count))
    rings, labels = connected_components(graph, directed=True, connection="weak")
    root = np.full(rings, count, dtype=np.int64)
    np.minimum.at(root, labels, index)  # each ring starts at its lowest edge: topmost, then leftmost
    size = np.bincount(labels, minlength=rings)

    # Pointer jumping: rank = steps until the edge that closes the ring back to its root.
    terminal = nxt == root[labels]
    succ = np.where(terminal, index, nxt)
    rank = (~terminal).astype(np.int64)
    active = np.flatnonzero(~terminal)
    while active.size:
        step = succ[active]
        further = succ[step]
        moving = further != step
        active, step, further = active[moving], step[moving], further[moving]
        rank[active] += rank[step]
        succ[active] = further

    ring_order = np.argsort(root)
    ring_start = np.empty(rings, dtype=np.int64)
    ring_start[ring_order] = np.cumsum(size[ring_order]) - size[ring_order]
    position = ring_start[labels] + size[labels] - 1 - rank
    order = np.empty(count, dtype=np.int64)
    order[position] = index

    ordered_direction = direction[order]
    starts = np.cumsum(size[ring_order]) - size[ring_order]
    previous = index - 1
    previous[starts] = starts + size[ring_order] - 1
    corner = ordered_direction != ordered_direction[previous]  # drop collinear vertices
    vertices = np.stack([sx[order][corner], sy[order][corner]], axis=1)
    per_ring = np.add.reduceat(corner.astype(np.int64), starts)
    return vertices, [0, *np.cumsum(per_ring).tolist()]


_ROWS_PER_CHUNK = 1 << 22  # bounds the scratch memory of one rasterising pass


def _fill_even_odd(rings: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Even-odd fill at pixel centres by scanlines: each edge toggles the pixels right of where it
    crosses a row's centre line; a running XOR along the row gives inside/outside.

    Linear in (rows crossed by edges + pixels), unlike a point-in-polygon test per pixel.
    """
    toggles = np.zeros((height, width + 1), dtype=np.uint8)
    if rings:
        start_points = np.concatenate(rings)
        ends = np.cumsum([len(ring) for ring in rings])
        following = np.arange(1, ends[-1] + 1)
        following[ends - 1] = np.r_[0, ends[:-1]]  # each ring closes on its first point
        end_points = start_points[following]
        sloped = start_points[:, 1] != end_points[:, 1]
        x0, y0 = start_points[sloped, 0], start_points[sloped, 1]
        x1, y1 = end_points[sloped, 0], end_points[sloped, 1]
        # Rows r whose centre r + 0.5 lies in [min(y0, y1), max(y0, y1)): a half-open rule, so a
        # vertex shared by two edges is counted once.
        first = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
        counts = np.maximum(stop - first, 0)
        cumulative = np.cumsum(counts)
        begin = 0
        while begin < counts.size:
            budget = (cumulative[begin - 1] if begin else 0) + _ROWS_PER_CHUNK
            end = max(int(np.searchsorted(cumulative, budget, side="right")), begin + 1)
            part = slice(begin, end)
            _toggle_crossings(toggles, x0[part], y0[part], x1[part], y1[part], first[part], counts[part])
            begin = end
    return np.bitwise_xor.accumulate(toggles, axis=1)[:, :width].astype(bool)


def _toggle_crossings(
    toggles: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    x1: np.ndarray,
    y1: np.ndarray,
    first: np.ndarray,
    counts: np.ndarray,
) -> None:
    total = int(counts.sum())
    if total == 0:
        return
    edge = np.repeat(np.arange(counts.size), counts)
    offsets = np.cumsum(counts) - counts
    rows = first[edge] + np.arange(total) - offsets[edge]
    centre = rows + 0.5
    x = x0[edge] + (centre - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    width = toggles.shape[1] - 1
    # Pixel c is right of the crossing when its centre c + 0.5 > x, i.e. c >= floor(x - 0.5) + 1.
    column = np.clip(np.floor(x - 0.5) + 1, 0, width).astype(np.int64)
    cells, hits = np.unique(rows * (width + 1) + column, return_counts=True)
    flat = toggles.reshape(-1)
    flat[cells[hits % 2 == 1]] ^= 1
