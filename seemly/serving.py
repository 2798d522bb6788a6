"""The wire format between a segmentation service and its clients (pydantic, JSON-compatible).

The Ray Serve ``Segmenter`` (``workers/serve.py``) and its client (``backend/serve_client.py``)
exchange these models, over HTTP as JSON or through a Ray Serve ``DeploymentHandle`` as plain
dicts. They live in the kernel because both sides import them and neither may import the other.

* An image is named by its **sha256** (the identity of its bytes) and size. The pixels travel only
  when the service asks for them: a request without ``image`` on an image the serving replica has
  not embedded answers ``status="need_image"`` and the client repeats it with the pixels (see
  docs/serve.md for why the service does not fetch URIs itself).
* Pixels are the decoded ``H x W x 3`` uint8 RGB array, base64 of the raw bytes in JSON
  (:class:`WireImage`); a ``DeploymentHandle`` caller passes the numpy array itself.
* Masks (memory and answers) are COCO RLE with a string ``counts``: compact and lossless.
* Memory is the earlier rounds on this image, oldest first, as the engine receives them; the
  service keeps no session state beyond the per-image embedding.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from seemly.engines.base import Segment
from seemly.log_setup import REQUEST_ID_PATTERN  # the backend's request id, forwarded to the replica
from seemly.masks import Mask, MaskError
from seemly.prompts import PromptRound, RoundResult

SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MEMORY_ROUNDS = 200

# Error kinds a service answers with, and the HTTP status the ingress gives each.
ERROR_STATUS: dict[str, int] = {
    "prompt": 422,  # an invalid prompt (``field`` names it)
    "unsupported_prompt": 422,  # the engine cannot follow this kind of prompt
    "bad_request": 400,  # malformed request (wrong pixel shape, bad memory mask, ...)
    "unknown_version": 404,  # no such model version
    "engine": 503,  # the engine cannot serve this request (missing weights, no proposals, ...)
    "unavailable": 503,  # no replica could be reached in time
    "internal": 500,  # a bug; details are in the service's log
}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WireImage(_Wire):
    """Decoded pixels: ``height x width x 3`` uint8 RGB, row-major, base64 of the raw bytes."""

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    data: str

    @classmethod
    def from_array(cls, array: np.ndarray) -> WireImage:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"pixels must be H x W x 3, got shape {array.shape}")
        return cls(
            height=array.shape[0], width=array.shape[1], data=base64.b64encode(array.data).decode("ascii")
        )

    def to_array(self) -> np.ndarray:
        raw = base64.b64decode(self.data, validate=True)
        expected = self.height * self.width * 3
        if len(raw) != expected:
            raise ValueError(
                f"image data has {len(raw)} bytes, {self.height}x{self.width}x3 needs {expected}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.height, self.width, 3)


class WireRound(_Wire):
    """One remembered round: the prompts, the mask the engine answered (COCO RLE), its score."""

    round: PromptRound
    rle: dict[str, Any]
    score: float = 1.0

    @classmethod
    def from_result(cls, result: RoundResult) -> WireRound:
        return cls(round=result.round, rle=result.mask.to_coco_rle(), score=float(result.score))

    def to_result(self) -> RoundResult:
        return RoundResult(self.round, Mask.from_coco_rle(self.rle), self.score)


class ImageRef(_Wire):
    """An image by identity, optionally with its pixels."""

    sha256: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    image: WireImage | None = None
    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not SHA256.match(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _same_size(self) -> ImageRef:
        if self.image is not None and (self.image.height, self.image.width) != (self.height, self.width):
            raise ValueError(
                f"image pixels are {self.image.width}x{self.image.height} but the request says "
                f"{self.width}x{self.height}"
            )
        return self


class SegmentRequest(ImageRef):
    """One interactive round (``round`` set) or whole-image proposals (``round`` None)."""

    round: PromptRound | None = None
    memory: list[WireRound] = Field(default_factory=list, max_length=MAX_MEMORY_ROUNDS)
    model_version: str | None = Field(default=None, max_length=200)
    recompute: bool = False  # embed afresh, bypassing the cache (benchmarks: a stateless service)

    def memory_results(self) -> tuple[RoundResult, ...]:
        results = []
        for index, item in enumerate(self.memory):
            try:
                result = item.to_result()
            except MaskError as exc:
                raise ValueError(f"memory[{index}].rle: {exc}") from exc
            if result.mask.shape != (self.height, self.width):
                raise ValueError(
                    f"memory[{index}].rle: mask is {result.mask.width}x{result.mask.height} but the image "
                    f"is {self.width}x{self.height}"
                )
            results.append(result)
        return tuple(results)


class PrefetchRequest(_Wire):
    """Embed these images ahead (the tasks an annotator will open next)."""

    images: list[ImageRef] = Field(min_length=1, max_length=64)
    model_version: str | None = Field(default=None, max_length=200)


class WireSegment(_Wire):
    rle: dict[str, Any]
    score: float
    model_version: str
    label: str | None = None

    @classmethod
    def from_segment(cls, segment: Segment) -> WireSegment:
        return cls(
            rle=segment.mask.to_coco_rle(),
            score=float(segment.score),
            model_version=segment.model_version,
            label=segment.label,
        )

    def to_segment(self) -> Segment:
        return Segment(Mask.from_coco_rle(self.rle), self.score, self.model_version, self.label)


class WireError(_Wire):
    type: str
    message: str
    field: str | None = None


class SegmentAnswer(_Wire):
    """What the service answers; ``status`` says which fields matter."""

    status: Literal["ok", "need_image", "error"]
    segments: list[WireSegment] = Field(default_factory=list)
    model_version: str | None = None
    cache_hit: bool | None = None  # None: the cache was not consulted (recompute, errors)
    replica: str | None = None  # the replica that answered (routing diagnostics)
    timings_ms: dict[str, float] = Field(default_factory=dict)  # measured inside the replica
    error: WireError | None = None
    request_id: str | None = None  # the caller's request id, echoed (it reached the replica)


def encode_memory(memory: tuple[RoundResult, ...] | list[RoundResult]) -> list[dict[str, Any]]:
    """Memory rounds as JSON-ready dicts."""
    return [WireRound.from_result(result).model_dump(mode="json", by_alias=True) for result in memory]
