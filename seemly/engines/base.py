"""The engine protocol every segmenter implements, and the registry that picks one by name.

Engines split work as SAM's predictor does: ``embed`` is the expensive, cacheable half (run once per
image and model version), ``segment`` the cheap half (run once per annotator round, given the
earlier rounds as memory). Nothing here knows about Ray or HTTP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seemly.masks import Mask
from seemly.prompts import PromptRound, RoundResult


class EngineError(RuntimeError):
    """The engine cannot serve this request (unsupported prompt kind, missing weights, ...)."""


class UnsupportedPromptError(EngineError, ValueError):
    """A prompt kind this engine (or its current configuration) cannot handle; a client error."""


@dataclass
class ImageState:
    """The cacheable result of :meth:`Engine.embed`; engines subclass it with their features."""

    sha256: str
    model_version: str
    height: int
    width: int
    extras: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Approximate memory held, for cache budgets: the sum of the numpy arrays it owns."""
        total = 0
        for value in list(vars(self).values()) + list(self.extras.values()):
            if isinstance(value, np.ndarray):
                total += value.nbytes
        return total


@dataclass(frozen=True)
class Segment:
    """One candidate answer: a mask, how sure the engine is, and which model made it."""

    mask: Mask
    score: float
    model_version: str
    label: str | None = None


class Engine(ABC):
    """Segmentation engine: ``embed`` once per image, ``segment`` once per round."""

    name: str = "engine"
    version: str = "0"

    @property
    def model_version(self) -> str:
        """The identifier stored with every mask and used in cache keys."""
        return f"{self.name}-{self.version}"

    @abstractmethod
    def embed(self, image: np.ndarray, sha256: str) -> ImageState:
        """Compute the per-image state (``image`` is ``H x W x 3`` uint8 RGB)."""

    @abstractmethod
    def segment(
        self, state: ImageState, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        """Candidate masks for this round, best first (never empty).

        ``memory`` holds the earlier rounds on the same image, oldest first; engines refine the last
        mask rather than start over.
        """

    @abstractmethod
    def segment_everything(self, state: ImageState) -> list[Segment]:
        """Non-overlapping region proposals covering the salient objects, best first."""


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An engine's input as contiguous ``H x W x 3`` uint8 (gray and RGBA accepted, others refused)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise UnsupportedPromptError(f"expected an H x W x 3 RGB image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


EngineFactory = Callable[..., Engine]
_REGISTRY: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Class decorator: make an engine available to :func:`create_engine` under ``name``."""

    def decorate(factory: EngineFactory) -> EngineFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_engines() -> list[str]:
    _load_builtin_engines()
    return sorted(_REGISTRY)


def create_engine(name: str, **options: Any) -> Engine:
    """Instantiate the engine registered as ``name``; a clear error lists the known names."""
    _load_builtin_engines()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**options)


def configured_engine_spec(settings: Any) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of the engine ``SEEMLY_ENGINE`` names: what a project with no promoted
    version is served with (backend, bucket job, active learning and the training gate agree on it)."""
    if settings.engine == "classic":
        return "classic", {}
    return settings.engine, {"checkpoint": settings.engine_checkpoint, "device": settings.device}


def _load_builtin_engines() -> None:
    # Imported lazily so that optional heavy dependencies (segment-anything, sam2) load only when
    # asked for; an engine whose optional package is missing simply is not registered.
    import importlib

    for module in (
        "seemly.engines.classic",
        "seemly.engines.sam",
        "seemly.engines.sam2",
        "seemly.engines.semantic",
        "seemly.bench.baselines",  # grabcut, randomwalker: the benchmark's comparison engines
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            continue
