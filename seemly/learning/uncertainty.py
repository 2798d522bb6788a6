"""How unsure the served model is about an image nobody has labelled yet (active learning).

Nobody has clicked on the image, so the image is probed with the prompts an annotator would start
with: a box around the centre of the image and a click at its centre, each jittered a few times
(seeded, so a ranking is reproducible). Three cues, each in [0, 1], higher = less sure:

* ``score``: 1 - the mean score the engine gives its own top answers;
* ``instability``: 1 - the mean pairwise IoU of the answers to the jittered prompts (an object
  with a clear outline comes out the same however the box is drawn);
* ``disagreement``: 1 - the mean IoU between the first and the second engine's answers to the same
  prompts (the current and the previous model version), when two engines are given.

The score is their weighted mean (the disagreement's weight is dropped with one engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from seemly.engines.base import Engine
from seemly.masks import Mask
from seemly.prompts import Box, Click, PromptRound

WEIGHTS = {"score": 0.3, "instability": 0.5, "disagreement": 0.4}


@dataclass(frozen=True)
class Uncertainty:
    score: float  # in [0, 1]; higher = less sure
    components: dict[str, float] = field(default_factory=dict)


def probe_prompts(height: int, width: int, *, seed: int = 0, count: int = 3) -> list[PromptRound]:
    """``count`` jittered centre boxes and ``count`` jittered centre clicks, in that order."""
    if height < 2 or width < 2:
        raise ValueError(f"image too small to probe: {width}x{height}")
    rng = np.random.default_rng(seed)
    rounds: list[PromptRound] = []
    for _ in range(count):
        share = rng.uniform(0.55, 0.85, size=2)  # box side as a share of the image side
        shift = rng.uniform(-0.06, 0.06, size=2)
        cx, cy = width * (0.5 + shift[0]), height * (0.5 + shift[1])
        half_w, half_h = width * share[0] / 2, height * share[1] / 2
        x0, x1 = max(0.0, cx - half_w), min(float(width), cx + half_w)
        y0, y1 = max(0.0, cy - half_h), min(float(height), cy + half_h)
        rounds.append(PromptRound(prompts=[Box(x0=x0, y0=y0, x1=x1, y1=y1)]))
    for _ in range(count):
        shift = rng.uniform(-0.08, 0.08, size=2)
        x = float(np.clip(width * (0.5 + shift[0]), 0.5, width - 0.5))
        y = float(np.clip(height * (0.5 + shift[1]), 0.5, height - 0.5))
        rounds.append(PromptRound(prompts=[Click(x=x, y=y, positive=True)]))
    return rounds


def _answers(engine: Engine, image: np.ndarray, sha256: str, rounds: Sequence[PromptRound]) -> list:
    state = engine.embed(image, sha256)
    return [engine.segment(state, r)[0] for r in rounds]


def _mean_pairwise_iou(masks: Sequence[Mask]) -> float:
    values = [masks[i].iou(masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    return float(np.mean(values)) if values else 1.0


def image_uncertainty(
    engines: Sequence[Engine], image: np.ndarray, sha256: str, *, seed: int = 0, probes: int = 3
) -> Uncertainty:
    """Uncertainty of ``engines[0]`` (the served model) on ``image``; ``engines[1]``, if given, is
    the version it is compared with."""
    if not engines:
        raise ValueError("give at least one engine (the served model)")
    if len(engines) > 2:
        raise ValueError("give one engine, or two: the current and the previous version")
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"expected an H x W (x 3) image, got shape {image.shape}")
    height, width = image.shape[:2]
    if not 2 <= probes <= 16:
        raise ValueError("probes must be between 2 and 16 (jittered boxes, and as many clicks)")
    rounds = probe_prompts(height, width, seed=seed, count=probes)
    current = _answers(engines[0], image, sha256, rounds)
    boxes, clicks = current[: len(rounds) // 2], current[len(rounds) // 2 :]
    scores = [float(np.clip(s.score, 0.0, 1.0)) for s in current]
    components = {
        "score": 1.0 - float(np.mean(scores)),
        # boxes with boxes and clicks with clicks: a click may rightly pick a part of the boxed object
        "instability": 1.0
        - 0.5 * (_mean_pairwise_iou([s.mask for s in boxes]) + _mean_pairwise_iou([s.mask for s in clicks])),
    }
    if len(engines) == 2:
        other = _answers(engines[1], image, sha256, rounds)
        components["disagreement"] = 1.0 - float(
            np.mean([a.mask.iou(b.mask) for a, b in zip(current, other, strict=True)])
        )
    total = sum(WEIGHTS[k] for k in components)
    score = sum(WEIGHTS[k] * v for k, v in components.items()) / total
    return Uncertainty(float(np.clip(score, 0.0, 1.0)), components)


STRATEGIES = ("top", "weighted", "hybrid")


def select_batch(
    scores: Sequence[float], k: int, rng: np.random.Generator, strategy: str = "weighted"
) -> list[int]:
    """Indices of the ``k`` images to label next, given each candidate's uncertainty.

    * ``top``: the ``k`` most uncertain, most uncertain first. Greedy: it takes the outliers first
      and a batch of near-duplicates of one hard case.
    * ``weighted``: ``k`` drawn without replacement with probability proportional to the uncertainty
      (Efraimidis-Spirakis keys ``u ** (1 / w)``), so hard images are likelier but the batch still
      spreads over the pool.
    * ``hybrid``: the ``ceil(k / 2)`` most uncertain plus the rest uniformly from the others.

    ``weighted`` and ``hybrid`` return the batch in random order, so that any position of it (the
    benchmark's gate image is the last) is a uniform draw from the batch, as in random order.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("scores must be finite, non-negative numbers")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, len(values))
    top = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if strategy == "top":
        return top[:k]
    if strategy == "weighted":
        weights = np.maximum(values, 1e-9)  # all-zero scores degrade to a uniform draw
        keys = np.log(rng.random(len(values)) + 1e-300) / weights  # log of u ** (1 / w): no underflow
        picked = [int(i) for i in np.argsort(-keys, kind="stable")[:k]]
    else:
        head = top[: (k + 1) // 2]
        rest = top[(k + 1) // 2 :]
        picked = head + [rest[int(i)] for i in rng.choice(len(rest), size=k - len(head), replace=False)]
    return [picked[int(i)] for i in rng.permutation(len(picked))]
