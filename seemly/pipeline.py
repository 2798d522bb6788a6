"""Segment one image from its bytes: the unit of work shared by the demo and the bucket job.

Pure and Ray-free: decode safely, ``embed``, then produce masks in the requested mode. Every
failure becomes an :class:`ImageOutcome` with ``error`` set (a failed row in the job report), so
one bad object never stops the rest of the work.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from seemly.engines.base import Engine, EngineError, Segment
from seemly.images import DecodedImage, ImageError, decode_image
from seemly.prompts import Box, PromptError, PromptRound


class SegmentMode(enum.StrEnum):
    """What to segment in each image when no annotator is there to prompt."""

    EVERYTHING = "everything"  # non-overlapping proposals (segment_everything)
    CENTER_BOX = "center-box"  # the object inside a centred box covering 80 % of the image


@dataclass
class ImageOutcome:
    """What became of one image: its identity and masks, or why it failed."""

    uri: str
    sha256: str | None = None
    width: int = 0
    height: int = 0
    size_bytes: int = 0
    segments: list[Segment] = field(default_factory=list)
    error: str | None = None
    embed_seconds: float = 0.0
    segment_seconds: float = 0.0
    image: DecodedImage | None = None  # only when asked for (keep_image): arrays are big

    @property
    def ok(self) -> bool:
        return self.error is None


def center_box(width: int, height: int, fraction: float = 0.8) -> Box:
    """A box centred in the image covering ``fraction`` of each side."""
    margin_x, margin_y = width * (1 - fraction) / 2, height * (1 - fraction) / 2
    return Box(x0=margin_x, y0=margin_y, x1=width - margin_x, y1=height - margin_y)


def segment_bytes(
    uri: str,
    data: bytes,
    engine: Engine,
    mode: SegmentMode,
    *,
    max_pixels: int,
    max_bytes: int,
    keep_image: bool = False,
) -> ImageOutcome:
    """Decode ``data`` and segment it with ``engine``; never raises for bad input."""
    outcome = ImageOutcome(uri=uri, size_bytes=len(data))
    try:
        image = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageError as exc:
        outcome.error = str(exc)
        return outcome
    outcome.sha256, outcome.width, outcome.height = image.sha256, image.width, image.height
    if keep_image:
        outcome.image = image
    try:
        started = time.perf_counter()
        state = engine.embed(image.array, image.sha256)
        embedded = time.perf_counter()
        if mode is SegmentMode.EVERYTHING:
            outcome.segments = engine.segment_everything(state)
        else:
            prompt_round = PromptRound(prompts=[center_box(image.width, image.height)])
            outcome.segments = engine.segment(state, prompt_round)[:1]
        outcome.embed_seconds = embedded - started
        outcome.segment_seconds = time.perf_counter() - embedded
        # An empty mask is never a silent success: it is a failed item with the reason.
        outcome.segments = [s for s in outcome.segments if not s.mask.is_empty]
        if not outcome.segments:
            outcome.error = f"the engine found no object ({mode.value} mode)"
    except (EngineError, PromptError, ValueError) as exc:
        outcome.error = f"segmentation failed: {exc}"
    return outcome
