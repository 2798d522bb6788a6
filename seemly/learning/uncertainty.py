"""How unsure the served model is about an image nobody has labelled yet (active learning).

Nobody has clicked on the image, so the image is probed with the prompts an annotator would start
with: a box around the centre of the image and a click at its centre, each jittered a few times
(seeded, so a ranking is reproducible), and one click on each object the engine guesses is there
(the deepest point of its answer to the centre box and of its best segment-everything regions:
where an annotator's first click on that object would go). Four cues, each in [0, 1], higher =
less sure:

* ``score``: 1 - the mean score the engine gives its own top answers;
* ``instability``: 1 - the mean pairwise IoU of the answers to the jittered centre prompts (an
  object with a clear outline comes out the same however the box is drawn);
* ``ambiguity``: 1 - the IoU of the best two answers to each click on a guessed object (part or
  whole?), averaged; the cue that predicted the clicks an image needs (docs/benchmarks.md);
* ``disagreement``: 1 - the mean IoU between the first and the second engine's answers to the same
  prompts (the current and the previous model version), when two engines are given.

The score is their weighted mean (``WEIGHTS``; the weights of absent cues are dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from seemly.engines.base import Engine, EngineError, ImageState, Segment
from seemly.learning.selection import STRATEGIES, select_batch  # noqa: F401  (re-exported: older imports)
from seemly.masks import Mask
from seemly.prompts import Box, Click, PromptRound

WEIGHTS = {"score": 0.3, "instability": 0.2, "ambiguity": 0.5, "disagreement": 0.4}


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


def _deepest_point(mask: np.ndarray) -> tuple[int, int] | None:
    """The interior pixel farthest from the mask's boundary (the image border counts as boundary):
    where the benchmark's simulated annotator, after RITM, puts the first click on an object."""
    if not mask.any():
        return None
    distance = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 0)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col)


def object_probes(
    engine: Engine, state: ImageState, guesses: Sequence[Mask], proposals: int
) -> list[PromptRound]:
    """One positive click at the deepest point of each object the engine guesses is there: its
    answer to the centre box (``guesses``) and its ``proposals`` best segment-everything regions.

    Why: the centre probes often miss the object altogether, so their answers say little about the
    clicks an annotator will make; a click on the object does."""
    masks = list(guesses)
    if proposals > 0:
        # an engine without proposals: the centre box's answer alone
        with contextlib.suppress(EngineError, NotImplementedError):
            masks += [s.mask for s in engine.segment_everything(state)[:proposals]]
    rounds, seen = [], set()
    for mask in masks:
        point = _deepest_point(mask.data)
        if point is not None and point not in seen:
            seen.add(point)
            rounds.append(PromptRound(prompts=[Click(x=point[1] + 0.5, y=point[0] + 0.5, positive=True)]))
    return rounds


def _mean_pairwise_iou(masks: Sequence[Mask]) -> float:
    values = [masks[i].iou(masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    return float(np.mean(values)) if values else 1.0


def _ambiguity(candidates: Sequence[Segment]) -> float:
    """1 - IoU of the best two answers to one click (part or whole?); 0 for a single answer."""
    return 1.0 - candidates[0].mask.iou(candidates[1].mask) if len(candidates) > 1 else 0.0


def image_uncertainty(
    engines: Sequence[Engine],
    image: np.ndarray,
    sha256: str,
    *,
    seed: int = 0,
    probes: int = 3,
    proposals: int | None = 2,
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
    if proposals is not None and not 0 <= proposals <= 16:
        raise ValueError("proposals must be between 0 and 16, or None (no clicks on guessed objects)")
    rounds = probe_prompts(height, width, seed=seed, count=probes)
    served = engines[0]
    state = served.embed(image, sha256)
    answers = [served.segment(state, r) for r in rounds]
    clicks = [] if proposals is None else object_probes(served, state, [answers[0][0].mask], proposals)
    click_answers = [served.segment(state, r) for r in clicks]
    tops = [a[0] for a in answers + click_answers]
    boxes, centre = tops[:probes], tops[probes : 2 * probes]
    components = {
        "score": 1.0 - float(np.mean([np.clip(t.score, 0.0, 1.0) for t in tops])),
        # boxes with boxes and clicks with clicks: a click may rightly pick a part of the boxed object
        "instability": 1.0
        - 0.5 * (_mean_pairwise_iou([t.mask for t in boxes]) + _mean_pairwise_iou([t.mask for t in centre])),
    }
    if proposals is not None:
        components["ambiguity"] = float(np.mean([_ambiguity(a) for a in click_answers])) if clicks else 0.0
    if len(engines) == 2:
        other_state = engines[1].embed(image, sha256)
        other = [engines[1].segment(other_state, r)[0] for r in rounds + clicks]
        components["disagreement"] = 1.0 - float(
            np.mean([a.mask.iou(b.mask) for a, b in zip(tops, other, strict=True)])
        )
    total = sum(WEIGHTS[k] for k in components)
    score = sum(WEIGHTS[k] * v for k, v in components.items()) / total
    return Uncertainty(float(np.clip(score, 0.0, 1.0)), components)
