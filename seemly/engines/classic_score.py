"""How good a candidate mask looks, without ground truth (to rank multimask answers).

One job: a score in [0, 1] from cues that hold for most real objects — the mask's boundary runs
along image edges (the contrast-sensitive graph weights are small there), and the engine is
confident about the pixels it labelled (the probability map is far from 0.5) — plus a prior for
the engine's default candidate. On GrabCut neither cue picks the better of the part / whole
candidates more often than the default reach does (measured: mean first-click IoU 0.81 for the
default, 0.64-0.78 when ranked by the cues, 0.85 for an oracle), so the prior dominates and the
alternatives rank after it unless their boundary is far stronger.
"""

from __future__ import annotations

import numpy as np

from seemly.engines.classic_features import Level


def boundary_strength(mask: np.ndarray, level: Level) -> float:
    """Mean ``1 - w`` over the mask's boundary edges (1: every boundary edge is a strong edge)."""
    total, count = 0.0, 0
    for (dr, dc), weight in level.edges.items():
        if (dr, dc) not in ((0, 1), (1, 0)):
            continue
        a = mask[: mask.shape[0] - dr, : mask.shape[1] - dc]
        b = mask[dr:, dc:]
        cut = a != b
        n = int(cut.sum())
        if n:
            total += float((1.0 - weight[: mask.shape[0] - dr, : mask.shape[1] - dc][cut]).sum())
            count += n
    return total / count if count else 0.0


def score(mask: np.ndarray, probability: np.ndarray, level: Level, preferred: bool = True) -> float:
    if not mask.any() or mask.all():
        return 0.0
    confidence = float(np.abs(probability - 0.5).mean() * 2.0)
    cues = 0.7 * boundary_strength(mask, level) + 0.3 * confidence
    return 0.5 * (1.0 if preferred else 0.5) + 0.5 * cues
