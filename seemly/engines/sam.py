"""SAM (Segment Anything, ``segment-anything`` 1.0) behind the engine protocol, with user-supplied weights.

The model code is Meta's official package; this module adds what the platform needs around it:

* **Weights**: ``create_engine("sam", checkpoint=URI, model_type="auto")`` loads a local path,
  ``file://`` or ``s3://`` checkpoint through :mod:`seemly.engines.checkpoints` (``weights_only``,
  architecture check naming the offending keys). ``model_type`` is ``vit_b`` / ``vit_l`` / ``vit_h``
  (the official configurations), ``tiny`` (a test-sized configuration), or ``auto`` (default): the
  configuration is read off the state dict's shapes, so fine-tuned and custom-sized checkpoints load
  too. ``model_version`` is ``sam-<model_type>-<sha256[:8]>``: new weights, new cache keys.
* **embed** = ``SamPredictor.set_image``: official preprocessing (ResizeLongestSide to ``img_size``,
  normalisation, padding) and the image encoder; the :class:`SamState` keeps the embedding on the
  engine's device with the original and input sizes.
* **segment** = ``SamPredictor.predict_torch`` on that embedding (prompt encoder + mask decoder):

  - clicks of *all* rounds of the session are point prompts (label 1 / 0), in order;
  - a box is the box prompt; the latest round that has boxes sets it (several boxes in one round:
    their union, as SAM takes one box per object);
  - a scribble becomes up to :data:`STROKE_POINTS` points evenly spaced along the stroke (at least
    :data:`STROKE_SPACING` px apart), with the scribble's label;
  - a positive polygon becomes its bounding box plus up to :data:`POLYGON_POINTS` interior points
    (the points deepest inside it, spread apart); a negative polygon gives negative interior points;
  - a mask prompt of the current round is the low-resolution mask input (and its bounding box the
    box prompt); a negative mask is forced to background in the mask input and adds negative points;
  - memory: the previous round's low-resolution logits are the mask input, as in SAM's own
    iterative protocol. They are kept in the state, keyed by the hash of each mask this engine
    returned; if the previous mask did not come from here (another engine, a user edit), it is
    downsampled to a logit map instead;
  - one ambiguous prompt (a single click, nothing else) gives SAM's three candidates, sorted by
    predicted IoU; anything more specific gives one mask, as SAM recommends.
  - Text and reference prompts raise :class:`UnsupportedPromptError` (they need a label model).

  Scores are SAM's predicted IoU, clipped to [0, 1].
* **segment_everything** = the official ``SamAutomaticMaskGenerator`` run on the cached embedding
  (its predictor is the same state-backed predictor, so the image is not encoded again), then made
  non-overlapping: best first, each proposal keeps the pixels no better one claimed.

Coordinates: seemly's continuous pixel coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``)
become SAM's pixel-index coordinates (``x - 0.5``, clamped into the image); a box covers the pixels
its corners enclose (index box ``(x0, y0, x1 - 1, y1 - 1)``), as SAM's own mask-to-box does.

Devices: ``device`` ``auto`` (CUDA when available) | ``cpu`` | ``cuda[:N]``; ``precision`` ``auto``
(bf16 autocast on a GPU that has it, else fp16; fp32 on CPU) | ``fp32`` | ``bf16`` | ``fp16``.
``torch``, ``segment_anything`` and the torchvision shim load only when an engine is created.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np

from seemly.engines import checkpoints
from seemly.engines.base import (
    Engine,
    EngineError,
    ImageState,
    Segment,
    UnsupportedPromptError,
    as_rgb,
    register_engine,
)
from seemly.masks import Mask
from seemly.prompts import Box, Click, MaskPrompt, Polygon, PromptRound, RoundResult, Scribble

if TYPE_CHECKING:
    import torch

    from seemly.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 64
"""Point prompts kept per request (the most recent ones) when a session piles up more."""
STROKE_POINTS = 6
"""Most points sampled along one scribble."""
STROKE_SPACING = 16.0
"""Least distance (pixels) between points sampled along a scribble."""
POLYGON_POINTS = 3
"""Interior points per polygon (and 2 per negative mask prompt)."""
MIN_POINT_DEPTH = 2.0
"""An extra interior point must lie this many pixels from the region's edge and from earlier points."""
LOGIT_MAGNITUDE = 8.0
"""Log-odds given to a binary mask (inside +, outside -) when it becomes SAM's mask input."""
LOGITS_CACHE_SIZE = 32
"""Low-resolution logits kept per image state (about 256 KB each at SAM's 256 x 256)."""
EVERYTHING_DEFAULTS: dict[str, Any] = {"points_per_side": 32, "points_per_batch": 64}
EVERYTHING_OPTIONS = frozenset(
    {
        "points_per_side",
        "points_per_batch",
        "pred_iou_thresh",
        "stability_score_thresh",
        "stability_score_offset",
        "box_nms_thresh",
        "min_mask_region_area",
        "mask_threshold",
        "use_m2m",
        "multimask_output",
    }
)
"""Options of the official automatic mask generators that ``everything={...}`` may set (no crops:
crops would encode the image again)."""

_LOGITS_LOCK = threading.Lock()


# --- state -----------------------------------------------------------------------------------------


@dataclass
class SamState(ImageState):
    """SAM / SAM 2 image state: the encoder's features and the logits of the masks returned so far."""

    features: Any = None  # SAM: (1, C, h, w) tensor; SAM 2: {"image_embed": ..., "high_res_feats": [...]}
    input_size: tuple[int, int] = (0, 0)  # the resized image inside the model's square input frame
    logits: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)

    def nbytes(self) -> int:
        total = super().nbytes() + sum(a.nbytes for a in list(self.logits.values()))
        return total + sum(t.element_size() * t.numel() for t in _tensors(self.features))

    def remember(self, key: str, low_res: np.ndarray) -> None:
        """Keep the low-res logits of a returned mask for the next round (bounded, most recent)."""
        with _LOGITS_LOCK:
            self.logits[key] = np.ascontiguousarray(low_res, dtype=np.float32)
            self.logits.move_to_end(key)
            while len(self.logits) > LOGITS_CACHE_SIZE:
                self.logits.popitem(last=False)

    def recall(self, key: str) -> np.ndarray | None:
        with _LOGITS_LOCK:
            return self.logits.get(key)


def _tensors(value: Any) -> Iterator[Any]:
    if value is None:
        return
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "element_size") and hasattr(value, "numel"):
        yield value


def mask_key(mask: np.ndarray) -> str:
    """Identity of a binary mask (shape + bits), to find the logits that produced it."""
    data = np.ascontiguousarray(mask, dtype=bool)
    digest = hashlib.blake2b(np.packbits(data).tobytes(), digest_size=16)
    digest.update(repr(data.shape).encode())
    return digest.hexdigest()


# --- prompts -----------------------------------------------------------------------------------------


@dataclass
class PointPrompts:
    """One request in SAM's terms, in continuous pixel coordinates of the original image."""

    points: list[tuple[float, float, int]]  # (x, y, label): 1 object, 0 background
    box: tuple[float, float, float, float] | None  # (x0, y0, x1, y1)
    mask: np.ndarray | None  # this round's positive mask prompts (H x W bool)
    negative: np.ndarray | None  # this round's negative mask prompts (H x W bool)

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None and self.mask is None

    @property
    def ambiguous(self) -> bool:
        """A single click alone: SAM's multimask case."""
        return len(self.points) == 1 and self.box is None and self.mask is None

    def point_arrays(self, height: int, width: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(N, 2)`` SAM pixel-index coordinates and ``(N,)`` labels; ``(None, None)`` without points."""
        if not self.points:
            return None, None
        array = np.asarray(self.points, dtype=np.float64)
        coords = np.stack(
            [np.clip(array[:, 0] - 0.5, 0, width - 1), np.clip(array[:, 1] - 0.5, 0, height - 1)], axis=1
        )
        return coords.astype(np.float32), array[:, 2].astype(np.int32)

    def box_array(self, height: int, width: int) -> np.ndarray | None:
        """The box as SAM's pixel-index ``(x0, y0, x1, y1)`` of the corner pixels it covers."""
        if self.box is None:
            return None
        x0, y0, x1, y1 = self.box
        ix0 = float(np.clip(x0, 0, width - 1))
        iy0 = float(np.clip(y0, 0, height - 1))
        ix1 = float(np.clip(max(x1 - 1.0, x0), ix0, width - 1))
        iy1 = float(np.clip(max(y1 - 1.0, y0), iy0, height - 1))
        return np.asarray([ix0, iy0, ix1, iy1], dtype=np.float32)


def stroke_points(
    points: Sequence[tuple[float, float]], max_points: int = STROKE_POINTS, spacing: float = STROKE_SPACING
) -> list[tuple[float, float]]:
    """Points evenly spaced along a polyline (segment centres of ``n`` equal parts of its length)."""
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(array) == 1:
        return [(float(array[0, 0]), float(array[0, 1]))]
    cumulative = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(array, axis=0).T))])
    length = float(cumulative[-1])
    if length <= 0:
        return [(float(array[0, 0]), float(array[0, 1]))]
    count = int(np.clip(math.ceil(length / spacing), 1, max_points))
    targets = (np.arange(count) + 0.5) * length / count
    xs = np.interp(targets, cumulative, array[:, 0])
    ys = np.interp(targets, cumulative, array[:, 1])
    return [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]


def interior_points(region: np.ndarray, count: int) -> list[tuple[float, float]]:
    """Up to ``count`` pixel centres deep inside ``region``, spread apart (first: the deepest)."""
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0 or count < 1:
        return []
    cols = np.flatnonzero(region.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=np.uint8)  # a background frame for the transform
    crop[1:-1, 1:-1] = region[r0:r1, c0:c1]
    score = cv2.distanceTransform(crop, cv2.DIST_L2, 5)
    grid_r, grid_c = np.ogrid[: crop.shape[0], : crop.shape[1]]
    chosen: list[tuple[float, float]] = []
    for _ in range(count):
        index = int(np.argmax(score))
        r, c = divmod(index, crop.shape[1])
        if score[r, c] <= 0 or (chosen and score[r, c] < MIN_POINT_DEPTH):
            break
        chosen.append((c - 1 + c0 + 0.5, r - 1 + r0 + 0.5))
        score = np.minimum(score, np.sqrt((grid_r - r) ** 2 + (grid_c - c) ** 2))
    return chosen


def _mask_box(region: np.ndarray) -> tuple[float, float, float, float]:
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def collect_prompts(
    prompt_round: PromptRound,
    memory: Sequence[RoundResult],
    height: int,
    width: int,
    max_points: int = DEFAULT_MAX_POINTS,
) -> PointPrompts:
    """The session's prompts as SAM sees them (see the module docstring for the rules)."""
    rounds = [result.round for result in memory] + [prompt_round]
    points: list[tuple[float, float, int]] = []
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    negative: np.ndarray | None = None
    for index, current_round in enumerate(rounds):
        current = index == len(rounds) - 1
        boxes: list[tuple[float, float, float, float]] = []
        for position, prompt in enumerate(current_round.prompts):
            if isinstance(prompt, Click):
                points.append((prompt.x, prompt.y, int(prompt.positive)))
            elif isinstance(prompt, Scribble):
                label = int(prompt.positive)
                points.extend((x, y, label) for x, y in stroke_points(prompt.points_xy))
            elif isinstance(prompt, Box):
                boxes.append((prompt.x0, prompt.y0, prompt.x1, prompt.y1))
            elif isinstance(prompt, Polygon):
                region = Mask.from_polygons([prompt.points_xy], height, width).data
                if prompt.positive:
                    if region.any():
                        boxes.append(_mask_box(region))
                    else:  # thinner than a pixel: its vertices' box still says where
                        xs = [x for x, _ in prompt.points_xy]
                        ys = [y for _, y in prompt.points_xy]
                        if max(xs) > min(xs) and max(ys) > min(ys):
                            boxes.append((min(xs), min(ys), max(xs), max(ys)))
                label = int(prompt.positive)
                points.extend((x, y, label) for x, y in interior_points(region, POLYGON_POINTS))
            elif isinstance(prompt, MaskPrompt):
                region = prompt.mask().data
                if region.shape != (height, width):
                    if current:
                        raise UnsupportedPromptError(
                            f"prompts[{position}].rle: mask is {region.shape[1]}x{region.shape[0]} "
                            f"but the image is {width}x{height}"
                        )
                    continue
                if not region.any():
                    continue
                if prompt.positive:
                    boxes.append(_mask_box(region))
                    if current:
                        mask = region.copy() if mask is None else mask | region
                else:
                    points.extend((x, y, 0) for x, y in interior_points(region, 2))
                    if current:
                        negative = region.copy() if negative is None else negative | region
            # text / reference prompts of earlier rounds (answered by another engine) carry nothing here
        if boxes:
            box = (
                min(b[0] for b in boxes),
                min(b[1] for b in boxes),
                max(b[2] for b in boxes),
                max(b[3] for b in boxes),
            )
    if len(points) > max_points:
        points = points[-max_points:]
    return PointPrompts(points, box, mask, negative)


# --- devices -----------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` to a torch device, with a clear error when absent."""
    import torch

    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise EngineError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(
            f"device {name!r} was asked for but no CUDA device is available (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use device=auto or cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise EngineError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32) for ``auto`` | ``fp32`` | ``bf16`` | ``fp16``."""
    import torch

    text = (precision or "auto").strip().lower()
    if text == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if text in ("fp32", "float32"):
        return None
    if text in ("bf16", "bfloat16"):
        return torch.bfloat16
    if text in ("fp16", "float16", "half"):
        if device.type != "cuda":
            raise EngineError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return torch.float16
    raise EngineError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")


# --- the shared engine -------------------------------------------------------------------------------


class PromptableEngine(Engine):
    """What SAM and SAM 2 share: checkpoint, device, prompt translation, memory, candidates.

    Subclasses implement building the model and the four model calls (`_embed`, `_predict`,
    `_logits_from_mask`, `_everything`).
    """

    name = "promptable"
    family_label: ClassVar[str] = "SAM"

    def __init__(
        self,
        checkpoint: str | None = None,
        model_type: str | None = "auto",
        device: str | None = None,
        precision: str | None = "auto",
        storage: Storage | None = None,
        cache_dir: str | Path | None = None,
        everything: Mapping[str, Any] | None = None,
        max_points: int = DEFAULT_MAX_POINTS,
        multimask: bool = True,
        **options: Any,
    ) -> None:
        if checkpoint is None or device is None:
            from seemly.config import get_settings

            settings = get_settings()
            checkpoint = checkpoint if checkpoint is not None else settings.engine_checkpoint
            device = device if device is not None else settings.device
        if not checkpoint:
            raise EngineError(
                f"the {self.name} engine needs a checkpoint: set SEEMLY_ENGINE_CHECKPOINT "
                f"(a path, file:// or s3:// URI) or pass checkpoint=...; see docs/engines.md"
            )
        self._import_package()
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        everything = dict(everything or {})
        unknown = sorted(set(everything) - EVERYTHING_OPTIONS)
        if unknown:
            raise EngineError(
                f"unknown everything option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(EVERYTHING_OPTIONS))}"
            )
        self.everything_options = {**EVERYTHING_DEFAULTS, **everything}
        self.max_points = int(max_points)
        self.multimask = bool(multimask)
        self.checkpoint = checkpoints.fetch_checkpoint(checkpoint, storage=storage, cache_dir=cache_dir)
        state_dict = checkpoints.load_state_dict(self.checkpoint)
        model, self.model_type = self._build_model(state_dict, model_type, options)
        del state_dict
        self.model = model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.version = f"{self.model_type}-{self.checkpoint.short_hash}"
        self._lock = threading.Lock()
        self._generator: Any = None
        log.info(
            "%s engine %s on %s (autocast %s), %d parameters",
            self.name,
            self.model_version,
            self.device,
            self.autocast_dtype or "off",
            sum(p.numel() for p in self.model.parameters()),
        )

    # --- subclass hooks ------------------------------------------------------------------------------
    def _import_package(self) -> None:
        raise NotImplementedError

    def _build_model(
        self, state_dict: dict[str, Any], model_type: str | None, options: Mapping[str, Any]
    ) -> tuple[torch.nn.Module, str]:
        raise NotImplementedError

    def _embed(self, image: np.ndarray) -> tuple[Any, tuple[int, int]]:
        """``(features, input_size)`` for an RGB uint8 image."""
        raise NotImplementedError

    def _predict(
        self,
        state: SamState,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masks C x H x W bool, scores C, low-res logits C x h x w)`` for one prompt set."""
        raise NotImplementedError

    def _logits_from_mask(self, state: SamState, mask: np.ndarray) -> np.ndarray:
        """A binary ``H x W`` mask as the ``1 x h x w`` low-res logits the prompt encoder takes."""
        raise NotImplementedError

    def _everything(self, state: SamState) -> list[dict[str, Any]]:
        """The official automatic mask generator's records for the whole image."""
        raise NotImplementedError

    # --- Engine --------------------------------------------------------------------------------------
    @contextmanager
    def inference(self) -> Iterator[None]:
        """``no_grad`` plus autocast on the engine's device when a low precision is in use."""
        import torch

        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else nullcontext()
        )
        with torch.no_grad(), autocast:
            yield

    def embed(self, image: np.ndarray, sha256: str) -> SamState:
        image = as_rgb(image)
        height, width = image.shape[:2]
        with self.inference():
            features, input_size = self._embed(image)
        return SamState(
            sha256=sha256,
            model_version=self.model_version,
            height=height,
            width=width,
            features=features,
            input_size=(int(input_size[0]), int(input_size[1])),
        )

    def segment(
        self, state: ImageState, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        state = self._check_state(state)
        unsupported = sorted({p.kind for p in prompt_round.prompts if p.kind in ("text", "reference")})
        if unsupported:
            raise UnsupportedPromptError(
                f"the {self.name} engine cannot follow {' or '.join(unsupported)} prompts: {self.family_label} "
                "takes clicks, boxes, scribbles, polygons and masks; text and reference prompts need a "
                "label model, which is not configured"
            )
        height, width = state.height, state.width
        prompts = collect_prompts(prompt_round, memory, height, width, self.max_points)
        mask_input = self._mask_input(state, prompts, memory)
        if prompts.empty and mask_input is None:
            return [Segment(Mask.empty(height, width), 0.0, self.model_version, prompt_round.label)]
        multimask = self.multimask and prompts.ambiguous and mask_input is None
        coords, labels = prompts.point_arrays(height, width)
        with self.inference():
            masks, scores, low_res = self._predict(
                state, coords, labels, prompts.box_array(height, width), mask_input, multimask
            )
        segments = []
        for index in np.argsort(-scores, kind="stable"):
            candidate = np.ascontiguousarray(masks[index], dtype=bool)
            state.remember(mask_key(candidate), low_res[index][None])
            score = float(np.clip(scores[index], 0.0, 1.0)) if np.isfinite(scores[index]) else 0.0
            segments.append(Segment(Mask(candidate), score, self.model_version, prompt_round.label))
        return segments

    def segment_everything(self, state: ImageState) -> list[Segment]:
        state = self._check_state(state)
        with self.inference():
            records = self._everything(state)
        records.sort(key=lambda r: (-float(r["predicted_iou"]), -int(r["area"])))
        claimed = np.zeros((state.height, state.width), dtype=bool)
        segments = []
        for record in records:
            proposal = np.asarray(record["segmentation"], dtype=bool)
            own = proposal & ~claimed
            area = int(own.sum())
            if area == 0 or area < 0.5 * int(proposal.sum()):
                continue  # mostly inside a better proposal
            claimed |= own
            score = float(np.clip(record["predicted_iou"], 0.0, 1.0))
            segments.append(Segment(Mask(own), score, self.model_version))
        return segments

    # --- internals -----------------------------------------------------------------------------------
    def _check_state(self, state: ImageState) -> SamState:
        if not isinstance(state, SamState) or state.features is None:
            raise EngineError(
                f"the {self.name} engine needs the state from its own embed(), got {type(state).__name__}"
            )
        if state.model_version != self.model_version:
            raise EngineError(
                f"image state was embedded by {state.model_version}, not {self.model_version}: embed again"
            )
        return state

    def _mask_input(
        self, state: SamState, prompts: PointPrompts, memory: Sequence[RoundResult]
    ) -> np.ndarray | None:
        logits: np.ndarray | None = None
        if prompts.mask is not None:
            logits = self._logits_from_mask(state, prompts.mask)
        elif memory:
            previous = memory[-1].mask.data
            if previous.shape == (state.height, state.width):
                logits = state.recall(mask_key(previous))
                if logits is None:
                    logits = self._logits_from_mask(state, previous)
        if logits is not None and prompts.negative is not None:
            background = self._logits_from_mask(state, prompts.negative) > 0
            logits = np.where(background, -LOGIT_MAGNITUDE, logits).astype(np.float32)
        return logits

    def _generator_template(self, build: Any) -> Any:
        with self._lock:
            if self._generator is None:
                self._generator = build()
            return self._generator


def binary_to_logits(probability: np.ndarray) -> np.ndarray:
    """Area fractions in [0, 1] to symmetric log-odds of magnitude :data:`LOGIT_MAGNITUDE`."""
    return ((2.0 * probability - 1.0) * LOGIT_MAGNITUDE).astype(np.float32)


def dummy_image(height: int, width: int) -> np.ndarray:
    """A zero-copy ``H x W x 3`` stand-in for the automatic generators, which only read its shape
    (their predictor serves the cached embedding instead of encoding it)."""
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (height, width, 3))


# --- SAM -----------------------------------------------------------------------------------------------

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArchitecture:
    """Every size of a SAM model; the official builders' values are the defaults (ViT-B encoder)."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    def build(self) -> torch.nn.Module:
        """An uninitialised-weights ``segment_anything.modeling.Sam`` of these sizes (as ``_build_sam``)."""
        import torch
        from segment_anything.modeling import (
            ImageEncoderViT,
            MaskDecoder,
            PromptEncoder,
            Sam,
            TwoWayTransformer,
        )

        grid = self.img_size // self.patch_size
        return Sam(
            image_encoder=ImageEncoderViT(
                depth=self.encoder_depth,
                embed_dim=self.encoder_embed_dim,
                img_size=self.img_size,
                mlp_ratio=self.mlp_ratio,
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=self.encoder_num_heads,
                patch_size=self.patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=self.encoder_global_attn_indexes,
                window_size=self.window_size,
                out_chans=self.prompt_embed_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=self.prompt_embed_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(self.img_size, self.img_size),
                mask_in_chans=self.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=self.num_multimask_outputs,
                transformer=TwoWayTransformer(
                    depth=self.decoder_depth,
                    embedding_dim=self.prompt_embed_dim,
                    mlp_dim=self.decoder_mlp_dim,
                    num_heads=self.decoder_num_heads,
                ),
                transformer_dim=self.prompt_embed_dim,
                iou_head_depth=self.iou_head_depth,
                iou_head_hidden_dim=self.iou_head_hidden_dim,
            ),
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], uri: str = "") -> SamArchitecture:
        """Read the sizes off a SAM state dict's shapes (decoder head count: SAM's 8)."""
        try:
            patch = state_dict["image_encoder.patch_embed.proj.weight"].shape  # (E, 3, p, p)
            grid = state_dict["image_encoder.pos_embed"].shape[1]
            embed_dim, patch_size = int(patch[0]), int(patch[-1])
            depth = _count(state_dict, "image_encoder.blocks.")
            head_dim = int(state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
            sizes = [
                (int(state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2
                for i in range(depth)
            ]
            mlp_dim = int(state_dict["image_encoder.blocks.0.mlp.lin1.weight"].shape[0])
            prompt_dim = int(state_dict["image_encoder.neck.0.weight"].shape[0])
            mask_in_chans = int(state_dict["prompt_encoder.mask_downscaling.0.weight"].shape[0]) * 4
            mask_tokens = int(state_dict["mask_decoder.mask_tokens.weight"].shape[0])
            decoder_depth = _count(state_dict, "mask_decoder.transformer.layers.")
            decoder_mlp = int(state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0])
            iou_hidden = int(state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])
            iou_depth = _count(state_dict, "mask_decoder.iou_prediction_head.layers.")
        except (KeyError, IndexError, AttributeError) as exc:
            first = ", ".join(list(state_dict)[:5])
            raise checkpoints.CheckpointArchitectureError(
                f"checkpoint {uri} does not look like a SAM (segment-anything) checkpoint: no {exc} "
                f"(first keys: {first or 'none'}); for SAM 2 use the sam2 engine"
            ) from None
        global_indexes = tuple(i for i, size in enumerate(sizes) if size == grid)
        windowed = [size for size in sizes if size != grid]
        return cls(
            encoder_embed_dim=embed_dim,
            encoder_depth=depth,
            encoder_num_heads=max(1, embed_dim // max(1, head_dim)),
            encoder_global_attn_indexes=global_indexes,
            img_size=int(grid) * patch_size,
            patch_size=patch_size,
            window_size=windowed[0] if windowed else 0,
            mlp_ratio=mlp_dim / embed_dim,
            prompt_embed_dim=prompt_dim,
            mask_in_chans=mask_in_chans,
            decoder_depth=decoder_depth,
            decoder_mlp_dim=decoder_mlp,
            iou_head_depth=iou_depth,
            iou_head_hidden_dim=iou_hidden,
            num_multimask_outputs=mask_tokens - 1,
        )

    def preset_name(self) -> str | None:
        return next((name for name, arch in SAM_PRESETS.items() if arch == self), None)


def _count(state_dict: Mapping[str, Any], prefix: str) -> int:
    indexes = {int(k[len(prefix) :].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    if not indexes:
        raise KeyError(prefix + "0")
    return max(indexes) + 1


SAM_PRESETS: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture(),
    "vit_l": SamArchitecture(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamArchitecture(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # Test-sized (random weights in the tests): 128 px input, 8 x 8 embedding, ~0.3 M parameters.
    "tiny": SamArchitecture(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        img_size=128,
        window_size=4,
        mlp_ratio=2.0,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ),
}


def require_segment_anything() -> Any:
    """Import ``segment_anything`` (with the torchvision shim when needed) or explain how to install it."""
    from seemly.engines.torchvision_compat import ensure_torchvision

    ensure_torchvision()
    try:
        import segment_anything
        import segment_anything.automatic_mask_generator  # imports torchvision.ops: fail here, not later
    except ModuleNotFoundError as exc:
        raise EngineError(
            f"the sam engine needs the optional package segment-anything ({exc}): "
            "pip install 'seemly[sam]' (see docs/engines.md)"
        ) from exc
    return segment_anything


@functools.cache
def _state_predictor_class() -> type:
    from segment_anything import SamPredictor

    class StateSamPredictor(SamPredictor):
        """``SamPredictor`` serving a cached :class:`SamState` instead of encoding an image."""

        def __init__(self, model: Any, state: SamState) -> None:
            super().__init__(model)
            self._state = state
            self._load()

        def _load(self) -> None:
            self.features = self._state.features
            self.original_size = (self._state.height, self._state.width)
            self.input_size = self._state.input_size
            self.is_image_set = True

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if tuple(image.shape[:2]) != (self._state.height, self._state.width):
                raise EngineError("automatic mask generation on crops is not supported (crop_n_layers=0)")
            self._load()

    return StateSamPredictor


@register_engine("sam")
class SamEngine(PromptableEngine):
    """Segment Anything (ViT-B/L/H or any size) with user-supplied weights; see the module docstring."""

    name = "sam"
    family_label = "SAM"

    def _import_package(self) -> None:
        require_segment_anything()

    def _build_model(
        self, state_dict: dict[str, Any], model_type: str | None, options: Mapping[str, Any]
    ) -> tuple[torch.nn.Module, str]:
        uri = self.checkpoint.uri
        if model_type in (None, "", "auto"):
            architecture = SamArchitecture.from_state_dict(state_dict, checkpoints._shown(uri))
            model_type = architecture.preset_name() or "custom"
        elif model_type in SAM_PRESETS:
            architecture = SAM_PRESETS[model_type]
        else:
            raise EngineError(
                f"unknown SAM model_type {model_type!r}; use auto or one of {', '.join(SAM_PRESETS)}"
            )
        self.architecture = architecture
        model = architecture.build()
        checkpoints.load_into(model, state_dict, f"SAM {model_type}", uri)
        return model, model_type

    @property
    def prompt_encoder(self) -> torch.nn.Module:
        return self.model.prompt_encoder

    def predictor(self, state: SamState) -> Any:
        """An official ``SamPredictor`` already "set" to ``state`` (cheap; one per call, thread-safe)."""
        return _state_predictor_class()(self.model, state)

    def _embed(self, image: np.ndarray) -> tuple[Any, tuple[int, int]]:
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.model)
        predictor.set_image(image, image_format="RGB")
        return predictor.features, tuple(predictor.input_size)

    def _predict(
        self,
        state: SamState,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        predictor = self.predictor(state)
        original = (state.height, state.width)
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None and labels is not None:
            coords_t = torch.as_tensor(predictor.transform.apply_coords(coords, original), dtype=torch.float)
            coords_t = coords_t.to(self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box_t = torch.as_tensor(predictor.transform.apply_boxes(box[None], original), dtype=torch.float)
            box_t = box_t.to(self.device)
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, scores, low_res = predictor.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output=multimask, return_logits=False
        )
        return (
            masks[0].cpu().numpy().astype(bool),
            scores[0].float().cpu().numpy(),
            low_res[0].float().cpu().numpy(),
        )

    def _logits_from_mask(self, state: SamState, mask: np.ndarray) -> np.ndarray:
        # The low-res logits cover the padded square input frame: resize the mask to the resized
        # image (input_size), pad it as SAM pads the image, then bring it down to the mask-input size.
        img_size = int(self.model.image_encoder.img_size)
        low_h, low_w = (int(v) for v in self.model.prompt_encoder.mask_input_size)
        in_h, in_w = state.input_size
        frame = np.zeros((img_size, img_size), dtype=np.float32)
        frame[:in_h, :in_w] = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_AREA)
        small = cv2.resize(frame, (low_w, low_h), interpolation=cv2.INTER_AREA)
        return binary_to_logits(small)[None]

    def _everything(self, state: SamState) -> list[dict[str, Any]]:
        from segment_anything import SamAutomaticMaskGenerator

        options = {
            k: v
            for k, v in self.everything_options.items()
            if k not in ("mask_threshold", "use_m2m", "multimask_output")
        }
        template = self._generator_template(lambda: SamAutomaticMaskGenerator(self.model, **options))
        generator = copy.copy(template)
        generator.predictor = self.predictor(state)
        return generator.generate(dummy_image(state.height, state.width))
