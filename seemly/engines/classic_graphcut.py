"""Binary graph cut on the 8-connected pixel grid (PyMaxflow's Boykov-Kolmogorov solver).

One job: given per-pixel log-odds of "object" and the precomputed contrast-sensitive edge weights,
return the minimum-energy labelling ``E = sum_p U_p(l_p) + gamma * sum_pq w_pq [l_p != l_q]``,
optionally only inside a band (the pixels outside keep a given labelling).
"""

from __future__ import annotations

import numpy as np

try:
    import maxflow
except ModuleNotFoundError as exc:  # pragma: no cover - a packaging error, not a runtime branch
    raise ModuleNotFoundError("the classic engine needs PyMaxflow: pip install PyMaxflow") from exc

HARD = 1e6
# Capacities are solved as integers (units of 1/RESOLUTION nats): the Boykov-Kolmogorov solver is
# several times faster on integer graphs than on float ones, and 0.01 is far below what matters.
RESOLUTION = 100.0


def capacity(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0.0, HARD) * RESOLUTION).astype(np.int64)


def _structure(dr: int, dc: int) -> np.ndarray:
    structure = np.zeros((3, 3), dtype=np.int64)
    structure[1 + dr, 1 + dc] = 1
    return structure


_STRUCTURES = {offset: _structure(*offset) for offset in ((0, 1), (1, 0), (1, 1), (1, -1))}


def cut(
    logit: np.ndarray,
    edges: dict[tuple[int, int], np.ndarray],
    gamma: float,
    hard_fg: np.ndarray | None = None,
    hard_bg: np.ndarray | None = None,
) -> np.ndarray:
    """The object mask minimising the energy; ``logit > 0`` favours the object."""
    unary = logit.astype(np.float64, copy=True)
    if hard_fg is not None:
        unary[hard_fg] = HARD
    if hard_bg is not None:
        unary[hard_bg] = -HARD
    graph = maxflow.Graph[int]()
    ids = graph.add_grid_nodes(unary.shape)
    if gamma > 0:
        for offset, weight in edges.items():
            graph.add_grid_edges(
                ids, weights=capacity(gamma * weight), structure=_STRUCTURES[offset], symmetric=True
            )
    graph.add_grid_tedges(ids, capacity(unary), capacity(-unary))
    graph.maxflow()
    return ~graph.get_grid_segments(ids)


def cut_band(
    logit: np.ndarray,
    edges: dict[tuple[int, int], np.ndarray],
    gamma: float,
    band: np.ndarray,
    outside: np.ndarray,
) -> np.ndarray:
    """Re-solve only the pixels of ``band``; every other pixel keeps its label from ``outside``.

    An edge from a band pixel to a fixed pixel becomes part of the band pixel's unary term (its
    cost is paid when the band pixel takes the other label), so the graph holds the band alone.
    """
    result = outside.copy()
    rows, cols = np.nonzero(band)
    count = rows.size
    if count == 0:
        return result
    height, width = band.shape
    index = np.full((height, width), -1, dtype=np.int64)
    index[rows, cols] = np.arange(count)
    unary = logit[rows, cols].astype(np.float64)
    graph = maxflow.Graph[int]()
    graph.add_nodes(count)
    fixed_sign = np.where(outside, 1.0, -1.0)
    for (dr, dc), weight in edges.items():
        for sign in (1, -1):  # each undirected edge seen from both of its ends
            r2, c2 = rows + sign * dr, cols + sign * dc
            ok = (r2 >= 0) & (r2 < height) & (c2 >= 0) & (c2 < width)
            src = np.nonzero(ok)[0]
            r2, c2 = r2[ok], c2[ok]
            # the weight array is indexed by the edge's first end (the one with the smaller offset)
            w = gamma * (weight[rows[src], cols[src]] if sign == 1 else weight[r2, c2]).astype(np.float64)
            other = index[r2, c2]
            inner = other >= 0
            if sign == 1 and inner.any():
                caps = capacity(w[inner])
                graph.add_edges(src[inner], other[inner], caps, caps)
            boundary = ~inner
            if boundary.any():
                np.add.at(unary, src[boundary], w[boundary] * fixed_sign[r2[boundary], c2[boundary]])
    graph.add_grid_tedges(np.arange(count), capacity(unary), capacity(-unary))
    graph.maxflow()
    result[rows, cols] = ~graph.get_grid_segments(np.arange(count))
    return result
