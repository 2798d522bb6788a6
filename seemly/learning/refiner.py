"""The learned refiner of the classic engine: a small U-Net that corrects the graph cut's mask.

Why this shape: the graph cut is exact for its energy but its energy is hand-made; what it gets
wrong (holes, leaks into similar colours, missed thin parts) is learnable from a project's own
corrections. The network sees a crop around the object and the clicks ("zoom-in", as FocalClick
and RITM do), resized to a fixed ``size`` so that a round costs the same on any image, and
predicts a *correction* of the classic logits at that low resolution. The correction is
upsampled and added to the full-resolution classic logits, so an untrained (zero-initialised)
refiner returns the classic mask unchanged and the classic boundary detail survives wherever the
network does not object. Seeds (click disks, scribbles) always keep their label.

Input planes (``C = 8``, all in ``[0, 1]`` once divided by 255): RGB, the classic probability,
the classic mask, positive and negative seeds as ``exp(-distance / sigma)``, the previous round's
mask. :func:`input_planes` builds them; training examples (``seemly.learning.examples``) store
exactly these planes as uint8, so training and serving cannot drift apart. By default the net
does not look at the RGB planes (``RefinerConfig.image``): trained on 30 GrabCut images it then
learned colour cues that did not transfer to held-out images (docs/benchmarks.md, "Learning
curve"); the classic probability already carries the image's colour evidence.

Files are ``torch.save`` dicts of strings and tensors (``{"kind", "format", "config", "meta",
"state_dict"}``) read back with ``weights_only=True``: no pickled code runs on load.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from seemly.engines.base import EngineError

if TYPE_CHECKING:
    from seemly.engines.classic_prompts import PromptMaps
    from seemly.storage import Storage

KIND = "seemly-classic-refiner"
FORMAT = 1
PLANES = 8  # RGB, probability, mask, positive seeds, negative seeds, previous mask
MAX_FILE_BYTES = 64 * 1024 * 1024


class RefinerError(EngineError, ValueError):
    """A refiner file that is not one, is corrupt, or does not fit its declared architecture."""


class RefinerConfig(BaseModel):
    """Architecture hyper-parameters; stored in every refiner file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(default=64, ge=16, le=512, description="side of the square working crop (pixels)")
    channels: tuple[int, ...] = Field(
        default=(12, 16, 24, 32), min_length=1, max_length=6, description="U-Net widths per level"
    )
    margin: float = Field(default=0.4, ge=0.0, le=3.0, description="crop margin, share of the object box")
    min_margin: int = Field(default=16, ge=0, le=512, description="crop margin at least (image pixels)")
    seed_sigma: float = Field(default=0.05, gt=0.0, le=1.0, description="seed encoding reach, share of size")
    base_logit: float = Field(default=3.0, gt=0.0, le=20.0, description="|logit| of the classic mask")
    image: bool = Field(
        default=False,
        description="let the net see the RGB planes (measured: from a few dozen images it then overfits)",
    )
    band: int = Field(
        default=0,
        ge=0,
        le=63,
        description="correct only this many working pixels around the classic boundary (0: anywhere)",
    )

    @field_validator("channels")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 or c > 256 for c in value):
            raise ValueError("every width must be between 1 and 256")
        return value

    @model_validator(mode="after")
    def _divisible(self) -> RefinerConfig:
        factor = 2 ** (len(self.channels) - 1)
        if self.size % factor:
            raise ValueError(
                f"size {self.size} must be divisible by {factor} for {len(self.channels)} levels"
            )
        return self


def _groups(channels: int) -> int:
    return next(g for g in (4, 3, 2, 1) if channels % g == 0)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm: without a normalisation the zero-initialised head made training stall for tens of
    # steps at random (measured); BatchNorm would depend on the batch, which DDP shards.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(inplace=True),
    )


class RefineNet(nn.Module):
    """A plain U-Net from the input planes to a logit correction (zero at initialisation)."""

    def __init__(self, config: RefinerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RefinerConfig()
        widths = self.config.channels
        self.down = nn.ModuleList()
        c_in = PLANES
        for width in widths:
            self.down.append(_block(c_in, width))
            c_in = width
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        """``planes`` N x 8 x S x S in [0, 1] -> final logits N x 1 x S x S (classic + correction)."""
        base = (2.0 * planes[:, 4:5] - 1.0) * self.config.base_logit
        rgb = (planes[:, :3] - 0.5) / 0.25
        if not self.config.image:
            rgb = torch.zeros_like(rgb)
        x = torch.cat([rgb, planes[:, 3:]], dim=1)
        skips = []
        for index, block in enumerate(self.down):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        delta = self.head(x)
        band = self.config.band
        if band:
            # only near the classic boundary: a small net trained on a few images must not invent
            # or erase whole regions far from where the graph cut hesitated
            mask = planes[:, 4:5]
            k = 2 * band + 1
            dilated = F.max_pool2d(mask, k, 1, band)
            eroded = -F.max_pool2d(-mask, k, 1, band)
            delta = delta * (dilated - eroded)
        return base + delta

    def correction(self, planes: torch.Tensor) -> torch.Tensor:
        """The correction alone (final logits minus the classic base)."""
        return self(planes) - (2.0 * planes[:, 4:5] - 1.0) * self.config.base_logit


# --- the crop and its planes (shared by serving and training) ------------------------------------
@dataclass(frozen=True)
class CropBox:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of the image the network works on."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def _span(lo: int, hi: int, side: int, limit: int) -> tuple[int, int]:
    """A span of ``side`` pixels centred on [lo, hi), shifted (then clipped) to fit [0, limit)."""
    side = min(side, limit)
    start = (lo + hi) // 2 - side // 2
    start = min(max(start, 0), limit - side)
    return start, start + side


def crop_box(config: RefinerConfig, mask: np.ndarray, maps: PromptMaps) -> CropBox | None:
    """A square (where the image allows) around the mask and the clicks; None when both are empty."""
    height, width = mask.shape
    rows: list[int] = []
    cols: list[int] = []
    if mask.any():
        r = np.flatnonzero(mask.any(axis=1))
        c = np.flatnonzero(mask.any(axis=0))
        rows += [int(r[0]), int(r[-1])]
        cols += [int(c[0]), int(c[-1])]
    for click in maps.clicks:
        rows.append(click.row)
        cols.append(click.col)
    if not rows:
        return None
    r0, r1, c0, c1 = min(rows), max(rows) + 1, min(cols), max(cols) + 1
    side = max(r1 - r0, c1 - c0)
    side = side + 2 * max(config.min_margin, round(config.margin * side))
    rr = _span(r0, r1, side, height)
    cc = _span(c0, c1, side, width)
    return CropBox(rr[0], rr[1], cc[0], cc[1])


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape[:2]
    method = cv2.INTER_AREA if h * w > size * size else cv2.INTER_LINEAR
    return cv2.resize(array, (size, size), interpolation=method)


def _seed_plane(seeds: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Seeds at the working size as ``exp(-distance / sigma)``: a 1-pixel click stays visible."""
    small = cv2.resize(seeds.astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA) > 0
    if not small.any():
        # a seed thinner than a working pixel: mark the pixel its centre falls in
        rows, cols = np.nonzero(seeds)
        if rows.size == 0:
            return np.zeros((size, size), dtype=np.float32)
        small = np.zeros((size, size), dtype=bool)
        sr = np.minimum((rows * size) // seeds.shape[0], size - 1)
        sc = np.minimum((cols * size) // seeds.shape[1], size - 1)
        small[sr, sc] = True
    distance = cv2.distanceTransform((~small).astype(np.uint8), cv2.DIST_L2, 3)
    return np.exp(-distance / (sigma * size)).astype(np.float32)


def input_planes(
    config: RefinerConfig,
    image: np.ndarray,
    maps: PromptMaps,
    mask: np.ndarray,
    probability: np.ndarray,
    box: CropBox,
) -> np.ndarray:
    """The network's input at the crop, ``8 x size x size`` uint8 (divide by 255 for [0, 1])."""
    size = config.size
    rs, cs = box.slices
    rgb = _resize(np.ascontiguousarray(image[rs, cs, :3]), size)
    planes = np.empty((PLANES, size, size), dtype=np.float32)
    planes[:3] = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    planes[3] = _resize(np.ascontiguousarray(probability[rs, cs], dtype=np.float32), size)
    planes[4] = _resize(mask[rs, cs].astype(np.float32), size)
    planes[5] = _seed_plane(maps.positive[rs, cs], size, config.seed_sigma)
    planes[6] = _seed_plane(maps.negative[rs, cs], size, config.seed_sigma)
    previous = maps.previous
    if previous is not None and previous.shape == mask.shape:
        planes[7] = _resize(previous[rs, cs].astype(np.float32), size)
    else:
        planes[7] = 0.0
    return np.round(np.clip(planes, 0.0, 1.0) * 255.0).astype(np.uint8)


def target_plane(config: RefinerConfig, gt: np.ndarray, box: CropBox) -> np.ndarray:
    """The ground truth at the crop, ``size x size`` uint8: the object's share of each pixel x 255."""
    rs, cs = box.slices
    small = _resize(np.ascontiguousarray(gt[rs, cs], dtype=np.float32), config.size)
    return np.round(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)


# --- the Refiner the classic engine calls -------------------------------------------------------
class LearnedRefiner:
    """A trained :class:`RefineNet` behind the classic engine's ``Refiner`` protocol.

    Eval mode, no autograd; one forward pass of ``size x size`` per candidate mask, whatever the
    image size (about 10 ms on one CPU core at the default size).
    """

    def __init__(
        self,
        model: RefineNet,
        *,
        device: str = "cpu",
        meta: dict[str, Any] | None = None,
        threads: int | None = 1,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.meta: dict[str, Any] = dict(meta or {})
        # One intra-op thread by default: the net is small, a server runs requests side by side,
        # and on a busy 2-core machine two threads were measured 20x slower than one (spinning).
        self.threads = threads

    @classmethod
    def untrained(cls, config: RefinerConfig | None = None, *, seed: int = 0) -> LearnedRefiner:
        """A fresh refiner (returns the classic mask unchanged until trained)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = RefineNet(config)
        return cls(model)

    @property
    def config(self) -> RefinerConfig:
        return self.model.config

    def predict_planes(self, planes: np.ndarray) -> np.ndarray:
        """Final logits (``N x size x size`` float32) for uint8 planes ``N x 8 x size x size``."""
        with torch.inference_mode(), _threads(self.threads if self.device.type == "cpu" else None):
            x = torch.from_numpy(np.ascontiguousarray(planes)).to(self.device, torch.float32) / 255.0
            return self.model(x)[:, 0].float().cpu().numpy()

    def __call__(
        self, image: np.ndarray, maps: PromptMaps, mask: np.ndarray, probability: np.ndarray
    ) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        out = mask.astype(np.float32)
        box = crop_box(self.config, mask, maps)
        if box is None:
            return out
        planes = input_planes(self.config, image, maps, mask, probability, box)
        with torch.inference_mode(), _threads(self.threads if self.device.type == "cpu" else None):
            x = torch.from_numpy(planes[None]).to(self.device, torch.float32) / 255.0
            delta = self.model.correction(x)[0, 0].float().cpu().numpy()
        height, width = box.shape
        delta_full = cv2.resize(delta, (width, height), interpolation=cv2.INTER_LINEAR)
        rs, cs = box.slices
        logit = (2.0 * mask[rs, cs].astype(np.float32) - 1.0) * self.config.base_logit + delta_full
        out[rs, cs] = 1.0 / (1.0 + np.exp(-np.clip(logit, -30.0, 30.0)))
        out[maps.positive] = 1.0
        out[maps.negative] = 0.0
        return out

    # --- persistence ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        payload = {
            "kind": KIND,
            "format": FORMAT,
            "config": self.config.model_dump_json(),
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, device: str = "cpu", source: str = "refiner") -> LearnedRefiner:
        """Load a file written by :meth:`to_bytes`; :class:`RefinerError` says what is wrong."""
        if not data:
            raise RefinerError(f"{source}: empty file, not a seemly refiner")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad archive
            detail = " ".join(str(exc).split())[:200]
            raise RefinerError(
                f"{source}: not a readable refiner file (corrupt or truncated?): {type(exc).__name__}: {detail}"
            ) from None
        if not isinstance(payload, dict) or payload.get("kind") != KIND:
            found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
            raise RefinerError(f"{source}: not a seemly classic refiner (found {found!r}, expected {KIND!r})")
        if payload.get("format") != FORMAT:
            raise RefinerError(
                f"{source}: refiner format {payload.get('format')!r} is not supported (this version reads {FORMAT})"
            )
        try:
            config = RefinerConfig.model_validate_json(payload.get("config", ""))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
            )
            raise RefinerError(f"{source}: invalid refiner config: {problems}") from None
        try:
            meta = json.loads(payload.get("meta") or "{}")
        except (TypeError, json.JSONDecodeError):
            meta = {}
        state = payload.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RefinerError(f"{source}: the refiner file holds no state_dict of tensors")
        from seemly.engines.checkpoints import describe_mismatch

        model = RefineNet(config)
        problem = describe_mismatch(model.state_dict(), state)
        if problem:
            raise RefinerError(f"{source}: weights do not fit the declared architecture: {problem}")
        model.load_state_dict(state, strict=True)
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise RefinerError(f"{source}: the refiner weights contain NaN or infinite values")
        return cls(model, device=device, meta=meta if isinstance(meta, dict) else {})

    def save(self, uri: str, storage: Storage | None = None) -> str:
        _storage(storage).write(uri, self.to_bytes(), content_type="application/octet-stream")
        return uri

    @classmethod
    def load(cls, uri: str, storage: Storage | None = None, *, device: str = "cpu") -> LearnedRefiner:
        from seemly.storage import StorageError, display_uri

        try:
            data = _storage(storage).read(uri, max_bytes=MAX_FILE_BYTES)
        except StorageError as exc:
            raise RefinerError(f"cannot read refiner {display_uri(uri)}: {exc}") from exc
        return cls.from_bytes(data, device=device, source=f"refiner {display_uri(uri)}")

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _storage(storage: Storage | None) -> Storage:
    if storage is not None:
        return storage
    from seemly.config import get_settings
    from seemly.learning.artifacts import artifact_storage

    return artifact_storage(get_settings())  # the artifacts folder is readable by default


def working_flops(config: RefinerConfig) -> float:
    """Approximate multiply-adds of one forward pass (for the cost budget in docs)."""
    total = 0.0
    size = config.size
    c_in = PLANES
    for level, width in enumerate(config.channels):
        pixels = (size / 2**level) ** 2
        total += pixels * 9 * (c_in * width + width * width)
        c_in = width
    for level in reversed(range(len(config.channels) - 1)):
        pixels = (size / 2**level) ** 2
        width = config.channels[level]
        total += pixels * 9 * ((config.channels[level + 1] + width) * width + width * width)
    return total


__all__ = [
    "CropBox",
    "LearnedRefiner",
    "RefineNet",
    "RefinerConfig",
    "RefinerError",
    "crop_box",
    "input_planes",
    "target_plane",
]
