"""Text, reference-image and combined prompts for every engine: a layer over a base engine.

:class:`SemanticEngine` wraps any :class:`~seemly.engines.base.Engine` (classic today, SAM later).
Visual prompts (clicks, boxes, scribbles, polygons, masks) go to the base engine unchanged. Text and
reference prompts are answered by scoring the base engine's ``segment_everything`` proposals:

* **text** names a project label (:mod:`seemly.text_labels`: "kitty" -> ``cat``); each proposal is
  scored with P(label) by the project's :class:`~seemly.engines.label_model.LabelModel` (learnt from
  its stored masks), or by an open-vocabulary image-text scorer
  (:class:`~seemly.engines.clip_scorer.ClipScorer`) when user-supplied weights are configured;
* **reference** (an example image + mask): each proposal is scored by its likeness to the example
  (:mod:`seemly.engines.reference`: colour model, local-feature placements).

The scores paint a map over the image (each pixel takes the score of its proposal). Regions whose
score reaches ``threshold`` are grouped into **instances** (connected groups of positive proposals:
an object the base engine split into parts comes back whole), and every candidate is ranked by

    semantic = purity x (0.3 + 0.7 x coverage)      (x appearance likeness, for references)

where *purity* is the candidate's mean score and *coverage* the share of the positive instance(s) it
touches that it covers. Text-only and reference-only rounds answer the instances, best first (several
when the image holds several); a round where nothing reaches ``min_score`` is a clear error.

**Combined** rounds (text or reference + clicks / box / scribbles): the visual prompts say *where*,
the text says *what*. Candidates are the base engine's answers to the visual prompts, the proposals
and instances inside the box / under the positive clicks, each ranked by semantic x fit, where *fit*
is how well it agrees with the visual prompts (inside the box, covering the positive clicks, not the
negative ones). Such a round always answers (the visual prompts alone could).

``SemanticEngine`` keeps the base engine's name and model version (its ``embed`` is the base's, and
its answers to visual prompts are the base's), so caches and stored masks are unaffected.
:func:`create_semantic_engine` builds one for a project; :class:`ProjectSemantics` is what the Label
Studio backend uses: one engine per project (labels + label model from the project's settings) over
the backend's segmenter client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import cv2
import numpy as np

from seemly.engines import reference as ref_match
from seemly.engines import region_features as rf
from seemly.engines.base import Engine, ImageState, Segment, UnsupportedPromptError, register_engine
from seemly.engines.label_model import LabelModel, project_label_model_uri
from seemly.masks import Mask
from seemly.prompts import Box, Click, PromptRound, Reference, RoundResult
from seemly.text_labels import Embedder, LabelMatch, TextLabelMatcher

log = logging.getLogger(__name__)

THRESHOLD = 0.5  # a proposal scoring this much is part of an instance
MIN_SCORE = 0.35  # a text/reference-only answer must score at least this much
MAX_KEEP_IMAGE_SIDE = 640  # the copy of the image kept for local features
VISUAL_BONUS = 1.05  # the base engine's own answers follow the prompts' boundaries best


class NothingFoundError(UnsupportedPromptError):
    """A text or reference prompt found nothing in this image; a client-side answer (422)."""


class Scorer(Protocol):
    """Open-vocabulary proposal scorer (see :mod:`seemly.engines.clip_scorer`)."""

    def score(
        self, image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], label: str
    ) -> np.ndarray:
        """P(``label``) per mask, among ``labels``."""
        ...


# --- per-image data ------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """What the semantic layer computes once per image (cached in the state or a small LRU)."""

    height: int
    width: int
    ctx: rf.RegionContext
    image: np.ndarray  # at most MAX_KEEP_IMAGE_SIDE on the long side
    proposals: list[Segment]
    small: list[np.ndarray]  # proposals at working resolution
    features: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    def proposal_features(self) -> np.ndarray:
        if self.features is None:
            self.features = rf.describe_many(self.ctx, self.small)
        return self.features


def _keep_copy(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    height, width = image.shape[:2]
    scale = MAX_KEEP_IMAGE_SIDE / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def _image_data(image: np.ndarray, height: int, width: int, proposals: list[Segment]) -> ImageData:
    ctx = rf.context(image)
    return ImageData(
        height=height,
        width=width,
        ctx=ctx,
        image=_keep_copy(image),
        proposals=proposals,
        small=[ctx.to_working(np.asarray(s.mask.data)) for s in proposals],
    )


class _View(Protocol):
    height: int
    width: int

    def visual(self, prompt_round: PromptRound, memory: Sequence[RoundResult]) -> list[Segment]: ...

    def data(self) -> ImageData: ...


class _EngineView:
    """The base engine and its state (library use: benchmarks, workers, tests)."""

    KEY = "semantic.data"

    def __init__(self, base: Engine, state: ImageState) -> None:
        self.base, self.state = base, state
        self.height, self.width = state.height, state.width

    def visual(self, prompt_round: PromptRound, memory: Sequence[RoundResult]) -> list[Segment]:
        return self.base.segment(self.state, prompt_round, memory)

    def data(self) -> ImageData:
        found = self.state.extras.get(self.KEY)
        if isinstance(found, ImageData):
            return found
        image = getattr(self.state, "image", None)
        if image is None:
            image = self.state.extras.get("semantic.image")
        if image is None:
            raise UnsupportedPromptError(
                f"the {self.base.name} engine's image state keeps no pixels: embed the image with "
                "SemanticEngine.embed to use text or reference prompts"
            )
        data = _image_data(image, self.height, self.width, self.base.segment_everything(self.state))
        self.state.extras[self.KEY] = data
        return data


class _ClientView:
    """A segmenter client (the backend's in-process or Ray Serve segmenter) and an image handle."""

    def __init__(self, client: Any, handle: Any, cache: _DataCache) -> None:
        self.client, self.handle, self.cache = client, handle, cache
        self.height, self.width = int(handle.height), int(handle.width)

    def visual(self, prompt_round: PromptRound, memory: Sequence[RoundResult]) -> list[Segment]:
        return self.client.segment(self.handle, prompt_round, memory)

    def data(self) -> ImageData:
        key = (self.handle.sha256, str(self.client.model_version))
        found = self.cache.get(key)
        if found is not None:
            return found
        proposals = self.client.segment_everything(self.handle)
        image = np.asarray(self.handle.load().array)
        data = _image_data(image, self.height, self.width, list(proposals))
        self.cache.put(key, data)
        return data


class _DataCache:
    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._items: OrderedDict[Any, ImageData] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> ImageData | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Any, value: ImageData) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# --- candidates ----------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    mask: np.ndarray  # full resolution
    small: np.ndarray  # working resolution
    source: str  # "visual" | "proposal" | "instance" | "placement"
    base_score: float = 0.0


def _working_box(box: Box, data: ImageData) -> tuple[int, int, int, int]:
    h, w = data.ctx.shape
    sy, sx = h / data.height, w / data.width
    r0, c0 = int(np.floor(box.y0 * sy)), int(np.floor(box.x0 * sx))
    r1, c1 = int(np.ceil(box.y1 * sy)), int(np.ceil(box.x1 * sx))
    return max(0, r0), max(0, c0), min(h, max(r1, r0 + 1)), min(w, max(c1, c0 + 1))


def _working_click(click: Click, data: ImageData) -> tuple[int, int]:
    h, w = data.ctx.shape
    row = min(h - 1, max(0, int(click.y * h / data.height)))
    col = min(w - 1, max(0, int(click.x * w / data.width)))
    return row, col


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class _Where:
    """What the visual prompts of a round say about *where* the object is (working resolution)."""

    def __init__(self, prompt_round: PromptRound, data: ImageData) -> None:
        self.boxes = [_working_box(b, data) for b in prompt_round.boxes]
        clicks = prompt_round.clicks
        self.positive = [_working_click(c, data) for c in clicks if c.positive]
        self.negative = [_working_click(c, data) for c in clicks if not c.positive]
        self.shape = data.ctx.shape
        self.region: np.ndarray | None = None
        if self.boxes:
            self.region = np.zeros(self.shape, bool)
            for r0, c0, r1, c1 in self.boxes:
                self.region[r0:r1, c0:c1] = True

    @property
    def any(self) -> bool:
        return bool(self.boxes or self.positive or self.negative)

    def admits(self, small: np.ndarray) -> bool:
        """Could this region be the object (mostly inside the box, under a positive click)?"""
        area = int(small.sum())
        if area == 0:
            return False
        if self.region is not None and float((small & self.region).sum()) / area < 0.5:
            return False
        if self.positive and not any(small[r, c] for r, c in self.positive):
            return self.region is not None  # inside a box, a part need not hold the click
        return not any(small[r, c] for r, c in self.negative)

    def fit(self, small: np.ndarray) -> float:
        area = int(small.sum())
        if area == 0:
            return 0.0
        fit = 1.0
        if self.region is not None:
            inside = float((small & self.region).sum()) / area
            box = _bbox(small)
            agreement = max(_box_iou(box, b) for b in self.boxes) if box else 0.0
            fit *= inside**2 * (0.7 + 0.3 * agreement)
        if self.positive:
            hit = sum(1 for r, c in self.positive if small[r, c]) / len(self.positive)
            fit *= 0.2 + 0.8 * hit
        if self.negative:
            miss = sum(1 for r, c in self.negative if not small[r, c]) / len(self.negative)
            fit *= 0.2 + 0.8 * miss
        return fit


def _instances(
    data: ImageData, scores: np.ndarray, threshold: float, admitted: np.ndarray | None = None
) -> list[list[int]]:
    """Groups of positive proposals that touch each other: one group per instance."""
    positive = [i for i, s in enumerate(scores) if s >= threshold and (admitted is None or admitted[i])]
    if not positive:
        return []
    union = np.zeros(data.ctx.shape, bool)
    for i in positive:
        union |= data.small[i]
    # a one-pixel closing joins parts that the downscaling separated by a hairline
    union8 = cv2.morphologyEx(union.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(union8, connectivity=8)
    groups: dict[int, list[int]] = {}
    for i in positive:
        component = np.bincount(labels[data.small[i]], minlength=count)
        component[0] = 0
        groups.setdefault(int(np.argmax(component)), []).append(i)
    return list(groups.values())


# --- the engine ----------------------------------------------------------------------------------------


class SemanticEngine(Engine):
    """Text / reference / combined prompts over a base engine; see the module docstring."""

    def __init__(
        self,
        base: Engine,
        label_model: LabelModel | None = None,
        text_matcher: TextLabelMatcher | None = None,
        clip: Scorer | None = None,
        *,
        labels: Sequence[str] | None = None,
        image_loader: Callable[[str], np.ndarray] | None = None,
        threshold: float = THRESHOLD,
        min_score: float = MIN_SCORE,
        embedder: Embedder | bool | None = None,
        keypoints: bool = True,
    ) -> None:
        if isinstance(base, SemanticEngine):
            base = base.base
        self.base = base
        self.label_model = label_model
        self.clip = clip
        if labels is None:
            labels = list(label_model.labels) if label_model is not None else []
        self.labels = list(labels)
        self.text_matcher = text_matcher or TextLabelMatcher(self.labels, embedder)
        self.image_loader = image_loader
        self.threshold = threshold
        self.min_score = min_score
        self.keypoints = keypoints  # local-feature placements for reference prompts
        self._references: OrderedDict[str, ref_match.ReferenceModel] = OrderedDict()
        self._references_lock = threading.Lock()
        self._client_cache = _DataCache()

    # the base engine's identity: states, caches and stored masks are the base engine's
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.base.name

    @property
    def version(self) -> str:  # type: ignore[override]
        return self.base.version

    @property
    def model_version(self) -> str:
        return self.base.model_version

    # --- Engine ------------------------------------------------------------------------------------
    def embed(self, image: np.ndarray, sha256: str) -> ImageState:
        state = self.base.embed(image, sha256)
        if getattr(state, "image", None) is None:
            state.extras["semantic.image"] = _keep_copy(image)
        return state

    def segment(
        self, state: ImageState, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        if not prompt_round.texts and not prompt_round.references:
            return self.base.segment(state, prompt_round, memory)
        return self._answer(_EngineView(self.base, state), prompt_round, memory)

    def segment_everything(self, state: ImageState) -> list[Segment]:
        found = state.extras.get(_EngineView.KEY)
        if isinstance(found, ImageData):
            return list(found.proposals)
        return self.base.segment_everything(state)

    def segment_with_client(
        self, client: Any, handle: Any, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        """The same answer through a segmenter client (``segment`` / ``segment_everything`` by handle)."""
        if not prompt_round.texts and not prompt_round.references:
            return client.segment(handle, prompt_round, memory)
        return self._answer(_ClientView(client, handle, self._client_cache), prompt_round, memory)

    # --- helpers for library users ---------------------------------------------------------------------
    def resolve_text(self, text: str) -> LabelMatch:
        """The project label a text names (raises :class:`~seemly.text_labels.TextLabelError`)."""
        return self.text_matcher.match(text)

    def find(self, state: ImageState, text: str) -> list[Segment]:
        """Every instance of what ``text`` names, best first (a text-only round)."""
        return self.segment(state, PromptRound(prompts=[{"kind": "text", "text": text}]))

    def classify_everything(self, state: ImageState, threshold: float | None = None) -> list[Segment]:
        """The base engine's proposals, each with the label model's best label when it is sure enough."""
        if self.label_model is None:
            return self.segment_everything(state)
        data = _EngineView(self.base, state).data()
        if not data.proposals:
            return []
        proba = self.label_model.predict_proba(data.proposal_features())
        cut = self.threshold if threshold is None else threshold
        out = []
        for segment, row in zip(data.proposals, proba, strict=True):
            best = int(np.argmax(row[:-1])) if len(row) > 1 else 0
            label = self.label_model.labels[best] if row[best] >= cut else None
            out.append(Segment(segment.mask, segment.score, segment.model_version, label))
        return out

    # --- scoring ---------------------------------------------------------------------------------------
    def _text_scores(self, data: ImageData, label: str) -> np.ndarray:
        if self.clip is not None:
            key = f"clip:{label}:{'|'.join(self.labels)}"
            if key not in data.scores:
                masks = [np.asarray(s.mask.data) for s in data.proposals]
                data.scores[key] = np.asarray(
                    self.clip.score(data.image, masks, self.labels or [label], label), np.float32
                )
            return data.scores[key]
        model = self.label_model
        if model is None or not model.knows(label):
            self._text_scores_unavailable(label)
        assert model is not None
        key = f"labels:{model.version}:{label}"
        if key not in data.scores:
            if not data.proposals:
                data.scores[key] = np.zeros(0, np.float32)
            else:
                data.scores[key] = model.score(data.proposal_features(), label).astype(np.float32)
        return data.scores[key]

    def reference_model(self, prompt: Reference) -> ref_match.ReferenceModel:
        """The (cached) model of a reference prompt's example; raises ReferenceError when unusable."""
        key = hashlib.sha256(
            (prompt.image_uri + "\n" + json.dumps(prompt.rle, sort_keys=True)).encode("utf-8")
        ).hexdigest()
        with self._references_lock:
            found = self._references.get(key)
            if found is not None:
                self._references.move_to_end(key)
                return found
        mask = prompt.mask()
        if mask.is_empty:
            raise ref_match.ReferenceError(
                "the reference mask is empty: mark the example object in the reference image"
            )
        loader = self.image_loader or default_image_loader()
        try:
            image = loader(prompt.image_uri)
        except UnsupportedPromptError:
            raise
        except Exception as exc:
            raise ref_match.ReferenceError(
                f"cannot read the reference image {prompt.image_uri!r}: {exc}"
            ) from exc
        model = ref_match.build_reference(np.asarray(image), np.asarray(mask.data), keypoints=self.keypoints)
        with self._references_lock:
            self._references[key] = model
            while len(self._references) > 32:
                self._references.popitem(last=False)
        return model

    # --- answering -------------------------------------------------------------------------------------
    def _answer(self, view: _View, prompt_round: PromptRound, memory: Sequence[RoundResult]) -> list[Segment]:
        label = prompt_round.label
        texts = prompt_round.texts
        match: LabelMatch | None = None
        if texts:
            match = self.resolve_text(" ".join(t.text for t in texts))
            label = match.label
            if self.clip is None and (self.label_model is None or not self.label_model.knows(label)):
                self._text_scores_unavailable(label)
        references = [self.reference_model(r) for r in prompt_round.references]
        visual_prompts = prompt_round.visual
        data = view.data()
        where = _Where(prompt_round, data)

        score_maps: list[np.ndarray] = []
        placements: list[ref_match.Placement] = []
        if match is not None:
            score_maps.append(self._text_scores(data, match.label))
        for model in references:
            found = ref_match.place(model, data.image, out_shape=(data.height, data.width))
            placements += found
            score_maps.append(ref_match.proposal_scores(model, data.ctx, data.small, found))
        scores = np.ones(len(data.small), np.float32)
        for s in score_maps:
            scores *= np.asarray(s, np.float32)
        scores **= 1.0 / max(1, len(score_maps))

        pixel = np.zeros(data.ctx.shape, np.float32)
        for small, s in zip(data.small, scores, strict=True):
            np.maximum(pixel, np.where(small, s, 0.0).astype(np.float32), out=pixel)
        for placement in placements:  # a located example is evidence of its own, pixel by pixel
            placed = data.ctx.to_working(placement.mask)
            np.maximum(pixel, np.where(placed, placement.confidence, 0.0).astype(np.float32), out=pixel)

        candidates: list[_Candidate] = []
        admitted = np.array([where.admits(s) for s in data.small], bool) if where.any else None
        groups = [] if (memory and visual_prompts) else _instances(data, scores, self.threshold, admitted)
        for group in groups:
            mask = np.zeros((data.height, data.width), bool)
            small = np.zeros(data.ctx.shape, bool)
            for i in group:
                mask |= np.asarray(data.proposals[i].mask.data)
                small |= data.small[i]
            candidates.append(_Candidate(mask, small, "instance"))
        for placement in placements:
            candidates.append(
                _Candidate(
                    placement.mask, data.ctx.to_working(placement.mask), "placement", placement.confidence
                )
            )
        if visual_prompts:
            visual_round = PromptRound(prompts=visual_prompts, label=label)
            for segment in view.visual(visual_round, memory):
                m = np.asarray(segment.mask.data)
                candidates.append(_Candidate(m, data.ctx.to_working(m), "visual", float(segment.score)))
            for i, small in enumerate(data.small):
                if memory:  # refining an answer: the annotator's clicks lead, the text only re-ranks
                    break
                if admitted is not None and admitted[i]:
                    candidates.append(_Candidate(np.asarray(data.proposals[i].mask.data), small, "proposal"))

        positive = pixel >= self.threshold
        _count, components = cv2.connectedComponents(positive.astype(np.uint8), connectivity=8)
        ranked: list[tuple[float, _Candidate]] = []
        for candidate in candidates:
            small = candidate.small
            area = int(small.sum())
            if area == 0:
                continue
            purity = float(pixel[small].mean())
            touched = np.unique(components[small & positive])
            touched = touched[touched > 0]
            if touched.size:
                instance = np.isin(components, touched)
                coverage = float((small & instance).sum()) / float(instance.sum())
            else:
                coverage = 0.0
            semantic = purity * (0.3 + 0.7 * coverage)
            if references and candidate.source != "visual":
                likeness = np.mean(
                    [rf.similarity(m.descriptor, rf.describe(data.ctx, small)).total for m in references]
                )
                semantic *= 0.5 + 0.5 * float(likeness)
            if candidate.source == "placement":
                semantic = max(semantic, candidate.base_score * (0.5 + 0.5 * purity))
            fit = where.fit(small) if where.any else 1.0
            total = semantic * fit
            if candidate.source == "visual":
                total *= VISUAL_BONUS
            ranked.append((total, candidate))
        ranked.sort(key=lambda item: -item[0])

        out: list[Segment] = []
        seen: list[np.ndarray] = []
        for total, candidate in ranked:
            if any(_same(candidate.small, other) for other in seen):
                continue
            seen.append(candidate.small)
            out.append(Segment(Mask(candidate.mask), float(min(1.0, total)), self.model_version, label))
        if visual_prompts:
            if not out:  # nothing to rank: the visual prompts alone
                return view.visual(PromptRound(prompts=visual_prompts, label=label), memory)
            return out
        good = [s for s in out if s.score >= self.min_score]
        if not good:
            best = out[0].score if out else 0.0
            what = f"{label!r}" if match is not None else "the reference example"
            raise NothingFoundError(
                f"no region of this image looks like {what} (best match {best:.2f}, needs "
                f"{self.min_score:.2f}); point at it with a click or a box"
            )
        return good

    def _text_scores_unavailable(self, label: str) -> NoReturn:
        model = self.label_model
        known = (
            f"its label model knows only {', '.join(model.labels)}"
            if model is not None
            else "this project has no label model yet"
        )
        raise UnsupportedPromptError(
            f"the {self.base.name} engine cannot find {label!r} from a text prompt: {known}; "
            f"label a few {label!r} regions and train the label model (`seemly labels train`), "
            "or use clicks, boxes, scribbles, polygons or masks"
        )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    union = np.count_nonzero(a | b)
    return union == 0 or np.count_nonzero(a & b) / union > 0.95


# --- construction --------------------------------------------------------------------------------------


_LOADER: Callable[[str], np.ndarray] | None = None


def default_image_loader() -> Callable[[str], np.ndarray]:
    """Reads reference images through :class:`seemly.storage.Storage` configured from the settings."""
    global _LOADER
    if _LOADER is None:
        from seemly.config import get_settings
        from seemly.images import decode_image
        from seemly.storage import Storage

        settings = get_settings()
        storage = Storage.from_settings(settings)

        def load(uri: str) -> np.ndarray:
            data = storage.read(uri, max_bytes=settings.max_image_bytes)
            decoded = decode_image(
                data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
            )
            return np.asarray(decoded.array)

        _LOADER = load
    return _LOADER


def create_semantic_engine(
    base: str | Engine = "classic",
    labels: Sequence[str] | None = None,
    label_model: LabelModel | str | None = None,
    *,
    clip: Scorer | str | None = None,
    clip_model: str = "ViT-B-32",
    clip_config: str | None = None,
    storage: Any | None = None,
    image_loader: Callable[[str], np.ndarray] | None = None,
    text_matcher: TextLabelMatcher | None = None,
    embedder: Embedder | bool | None = None,
    **engine_options: Any,
) -> SemanticEngine:
    """A :class:`SemanticEngine` for one project.

    ``base`` is an engine or a registered engine name (``engine_options`` go to it); ``labels`` the
    project's label names (default: the label model's); ``label_model`` a model or its artifact URI
    (read with ``storage``, default from the settings); ``clip`` an open-vocabulary scorer or the
    URI of a CLIP checkpoint (:class:`~seemly.engines.clip_scorer.ClipScorer`) of the open_clip
    architecture ``clip_model``, or of the one described by the model config JSON ``clip_config``.
    """
    if isinstance(base, str):
        from seemly.engines.base import create_engine

        base = create_engine(base, **engine_options)
    if isinstance(clip, str):
        from seemly.engines.clip_scorer import ClipScorer

        clip = ClipScorer(clip, clip_model, model_config=clip_config, storage=storage)
    if isinstance(label_model, str):
        if storage is None:
            from seemly.config import get_settings
            from seemly.storage import Storage

            storage = Storage.from_settings(get_settings())
        label_model = LabelModel.load(label_model, storage)
    return SemanticEngine(
        base,
        label_model,
        text_matcher,
        clip,
        labels=labels,
        image_loader=image_loader,
        embedder=embedder,
    )


@register_engine("semantic")
def _semantic_factory(
    base: str | Engine = "classic",
    labels: Sequence[str] | None = None,
    label_model: LabelModel | str | None = None,
    **options: Any,
) -> SemanticEngine:
    return create_semantic_engine(base, labels, label_model, **options)


# --- the backend's per-project view ----------------------------------------------------------------------


def clip_from_settings(settings: Any, storage: Any | None = None) -> Scorer | None:
    """The open_clip scorer ``SEEMLY_CLIP_CHECKPOINT`` names, or None; a bad checkpoint raises with why."""
    if not settings.clip_checkpoint:
        return None
    from seemly.engines.clip_scorer import ClipScorer

    return ClipScorer(
        settings.clip_checkpoint, settings.clip_model, model_config=settings.clip_config, storage=storage
    )


class ProjectSemantics:
    """One :class:`SemanticEngine` per Label Studio project, over the backend's segmenter client.

    The labels come from the request's labeling config; open-vocabulary scoring from ``clip`` (the
    backend loads ``SEEMLY_CLIP_CHECKPOINT`` once, :func:`clip_from_settings`); the label model from
    the URI stored in the project's settings (``projects.settings["label_model"]["uri"]``, written by
    ``seemly labels train``), looked up at most every ``refresh_seconds`` so that a retrained model is
    picked up without a restart. A database or storage failure means "no label model" (logged).
    """

    def __init__(
        self,
        db: Any,
        storage: Any,
        *,
        image_loader: Callable[[str], np.ndarray] | None = None,
        refresh_seconds: float = 60.0,
        embedder: Embedder | bool | None = None,
        max_projects: int = 64,
        clip: Scorer | None = None,
    ) -> None:
        self.db, self.storage = db, storage
        self.clip = clip  # open-vocabulary scorer for every project (SEEMLY_CLIP_CHECKPOINT)
        self.image_loader = image_loader
        self.refresh_seconds = refresh_seconds
        self.embedder = embedder
        self.max_projects = max_projects
        self._lock = threading.Lock()
        self._engines: OrderedDict[tuple[int, tuple[str, ...]], tuple[SemanticEngine, str | None, float]] = (
            OrderedDict()
        )
        self._models: dict[str, LabelModel] = {}
        self._matchers: dict[tuple[str, ...], TextLabelMatcher] = {}

    def matcher(self, labels: Sequence[str]) -> TextLabelMatcher:
        key = tuple(labels)
        with self._lock:
            found = self._matchers.get(key)
            if found is None:
                found = self._matchers[key] = TextLabelMatcher(key, self.embedder)
                if len(self._matchers) > 256:
                    self._matchers.pop(next(iter(self._matchers)))
            return found

    def label_for_text(self, labels: Sequence[str], text: str) -> str | None:
        """The label ``text`` names among ``labels``, or ``None`` (never raises for unknown text)."""
        found = self.matcher(labels).try_match(text) if text and text.strip() else None
        return found.label if found else None

    def _label_model_uri(self, ls_project_id: int) -> str | None:
        from sqlalchemy import select
        from sqlalchemy.exc import SQLAlchemyError

        from seemly.db.models import Project

        try:
            with self.db.connect() as conn:
                settings = conn.execute(
                    select(Project.settings).where(Project.ls_project_id == ls_project_id)
                ).scalar()
        except SQLAlchemyError as exc:
            log.warning("cannot read project %s's label model: %s", ls_project_id, type(exc).__name__)
            return None
        return project_label_model_uri(settings)

    def _label_model(self, uri: str | None) -> LabelModel | None:
        if uri is None:
            return None
        with self._lock:
            found = self._models.get(uri)
        if found is not None:
            return found
        try:
            model = self._load(uri)
        except Exception as exc:  # a broken or unreachable artifact: text prompts say "no label model"
            log.warning("cannot load the label model %s: %s", uri, exc)
            return None
        with self._lock:
            self._models[uri] = model
            if len(self._models) > self.max_projects:
                self._models.pop(next(iter(self._models)))
        return model

    def _load(self, uri: str) -> LabelModel:
        from seemly.storage import StorageAccessError

        try:
            return LabelModel.load(uri, self.storage)
        except StorageAccessError:
            # the default artifact folder ($SEEMLY_HOME/label_models) is seemly's own: readable even
            # when it is not among the file roots that task images may come from
            from seemly.engines.label_model import label_model_storage

            return LabelModel.load(uri, label_model_storage())

    def engine(self, ls_project_id: int, labels: Sequence[str], base: Engine | None = None) -> SemanticEngine:
        key = (int(ls_project_id), tuple(labels))
        now = time.monotonic()
        with self._lock:
            found = self._engines.get(key)
        if found is not None and now - found[2] < self.refresh_seconds:
            return found[0]
        uri = self._label_model_uri(ls_project_id)
        if found is not None and found[1] == uri:
            with self._lock:
                self._engines[key] = (found[0], uri, now)
            return found[0]
        engine = SemanticEngine(
            base or _NoBase(),
            self._label_model(uri),
            self.matcher(labels),
            self.clip,
            labels=labels,
            image_loader=self.image_loader,
        )
        with self._lock:
            self._engines[key] = (engine, uri, now)
            self._engines.move_to_end(key)
            while len(self._engines) > self.max_projects:
                self._engines.popitem(last=False)
        return engine

    def segment(
        self,
        ls_project_id: int,
        labels: Sequence[str],
        client: Any,
        handle: Any,
        prompt_round: PromptRound,
        memory: Sequence[RoundResult] = (),
    ) -> list[Segment]:
        """Answer a round with text / reference prompts for one project, through ``client``."""
        base = getattr(client, "engine", None)
        engine = self.engine(ls_project_id, labels, base if isinstance(base, Engine) else None)
        return engine.segment_with_client(client, handle, prompt_round, memory)


class _NoBase(Engine):
    """Stands in for a remote base engine (Ray Serve): the client does the work, this only names it."""

    name = "remote"
    version = "0"

    def embed(self, image: np.ndarray, sha256: str) -> ImageState:  # pragma: no cover - never called
        raise UnsupportedPromptError("the remote segmenter embeds images itself")

    def segment(self, state, prompt_round, memory=()):  # pragma: no cover - never called
        raise UnsupportedPromptError("the remote segmenter segments images itself")

    def segment_everything(self, state):  # pragma: no cover - never called
        raise UnsupportedPromptError("the remote segmenter segments images itself")
