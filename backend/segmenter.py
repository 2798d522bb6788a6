"""Who computes the masks: a small client protocol, and the in-process implementation.

The HTTP layer never touches an engine directly; it talks to a :class:`SegmenterClient`. The
client runs the engine in this process (:class:`InProcessSegmenter`) or calls the Ray Serve
deployment (``backend.serve_client.ServeSegmenter``); both have the same three members, so nothing
above this module changes.

An image is passed as an :class:`ImageHandle`: its identity (sha256) and size, plus ``load`` to get
the pixels. A client calls ``load`` only when it has no cached embedding for that image, so the
second and later rounds on an image neither download nor decode it again.

The in-process client caches ``embed`` results per (sha256, model version) with
:class:`seemly.embed_cache.EmbedCache` (the same cache the Ray Serve replicas use): an LRU bounded
by a memory budget (``ImageState.nbytes``), single-flight embeds, and ``segment`` calls on one image
state serialised (engine states keep small per-image caches that are not thread-safe); different
images run in parallel.

:func:`make_segmenter_client` picks the implementation from the settings: in-process by default,
the Ray Serve ``Segmenter`` service (``backend.serve_client``) when ``SEEMLY_SEGMENTER_URL`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from seemly.embed_cache import CacheStats, EmbedCache
from seemly.engines.base import Engine, EngineError, ImageState, Segment
from seemly.images import DecodedImage
from seemly.learning.loading import load_version
from seemly.learning.versions import VersionInfo
from seemly.prompts import PromptRound, RoundResult

if TYPE_CHECKING:
    from seemly.config import Settings

log = logging.getLogger(__name__)

RETRY_LOAD_S = 60.0
"""A model version that failed to load is retried after this long (meanwhile: the base engine)."""


class ImageChangedError(RuntimeError):
    """The bytes behind a URI no longer have the sha256 the caller was told (the object was replaced)."""


@dataclass(frozen=True)
class ImageHandle:
    """An image by identity; ``load()`` returns the decoded pixels (only called on a cache miss)."""

    sha256: str
    width: int
    height: int
    uri: str
    load: Callable[[], DecodedImage] = field(repr=False, compare=False)


@runtime_checkable
class SegmenterClient(Protocol):
    """What the backend needs from a segmentation service."""

    @property
    def model_version(self) -> str:
        """The version stored with every mask and answered to Label Studio."""
        ...

    def segment(
        self, image: ImageHandle, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        """Candidate masks for one round, best first."""
        ...

    def segment_everything(self, image: ImageHandle) -> list[Segment]:
        """Region proposals for the whole image (batch pre-annotation)."""
        ...

    def for_version(self, info: Any) -> SegmenterClient:
        """This client segmenting with a registered version (``VersionInfo``; None = the default)."""
        ...


class _Loaded:
    """What an in-process client and its per-version views share: the cache and the loaded engines."""

    def __init__(self, base: Engine, cache: EmbedCache, max_versions: int, device: str | None) -> None:
        if max_versions < 1:
            raise ValueError("max_versions must be at least 1")
        self.base = base
        self.cache = cache
        self.max_versions = max_versions
        self.device = device
        self.lock = threading.Lock()
        self.engines: OrderedDict[str, Engine] = OrderedDict()  # version name -> engine, LRU
        self.loading: dict[str, threading.Lock] = {}
        self.failed: dict[str, float] = {}  # version name -> when loading it last failed

    def engine_for(self, info: VersionInfo) -> Engine | None:
        """The loaded engine of ``info`` (loaded once, even by concurrent requests); None if it
        cannot be loaded (logged; retried after :data:`RETRY_LOAD_S`)."""
        with self.lock:
            engine = self.engines.get(info.name)
            if engine is not None:
                self.engines.move_to_end(info.name)
                return engine
            if time.monotonic() - self.failed.get(info.name, -RETRY_LOAD_S) < RETRY_LOAD_S:
                return None
            gate = self.loading.setdefault(info.name, threading.Lock())
        with gate:  # single flight: one thread loads, the others wait for it
            with self.lock:
                engine = self.engines.get(info.name)
            if engine is not None:
                return engine
            try:
                engine = load_version(info, device=self.device)
            except Exception as exc:
                log.error(
                    "cannot load model version %s (%s: %s); serving the base engine %s instead",
                    info.name,
                    type(exc).__name__,
                    exc,
                    self.base.model_version,
                )
                with self.lock:
                    self.failed[info.name] = time.monotonic()
                return None
            with self.lock:
                self.failed.pop(info.name, None)
                self.engines[info.name] = engine
                while len(self.engines) > self.max_versions:
                    evicted, _ = self.engines.popitem(last=False)
                    log.info("unloaded model version %s (more than %d loaded)", evicted, self.max_versions)
            return engine


class InProcessSegmenter:
    """Runs an :class:`~seemly.engines.base.Engine` here, with an LRU embedding cache (see module doc).

    :meth:`for_version` gives a view of the same client that segments with a registered model
    version (a project's promoted fine-tune): engines are loaded on first use, at most
    ``max_versions`` side by side (least recently used unloaded first), and the views share one
    embedding cache, keyed by (sha256, version).
    """

    def __init__(
        self,
        engine: Engine,
        cache_bytes: int = 1024 * 1024 * 1024,
        *,
        max_versions: int = 4,
        device: str | None = None,
        _loaded: _Loaded | None = None,
    ) -> None:
        self.engine = engine
        # EmbedCache raises ValueError unless cache_bytes >= 1
        self._loaded = _loaded or _Loaded(engine, EmbedCache(cache_bytes), max_versions, device)

    @property
    def cache(self) -> EmbedCache:
        return self._loaded.cache

    @property
    def cache_bytes(self) -> int:
        return self.cache.cache_bytes

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    @property
    def model_version(self) -> str:
        return self.engine.model_version

    @property
    def cached_bytes(self) -> int:
        return self.cache.cached_bytes

    @property
    def loaded_versions(self) -> list[str]:
        with self._loaded.lock:
            return list(self._loaded.engines)

    def for_version(self, info: VersionInfo | None) -> InProcessSegmenter:
        """This client segmenting with ``info`` (None, or a version that cannot load: the base engine)."""
        loaded = self._loaded
        if info is None or info.name == loaded.base.model_version:
            engine: Engine | None = loaded.base
        else:
            engine = loaded.engine_for(info)
        if engine is None:
            engine = loaded.base
        if engine is self.engine:
            return self
        return InProcessSegmenter(engine, _loaded=loaded)

    def cached(self, sha256: str) -> bool:
        return self.cache.contains(sha256, self.model_version)

    def segment(
        self, image: ImageHandle, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        with self.cache.use(image.sha256, self.model_version, lambda: self._embed(image)) as (state, _hit):
            return self.engine.segment(state, prompt_round, memory)

    def segment_everything(self, image: ImageHandle) -> list[Segment]:
        with self.cache.use(image.sha256, self.model_version, lambda: self._embed(image)) as (state, _hit):
            try:
                return self.engine.segment_everything(state)
            except (NotImplementedError, ImportError) as exc:
                raise EngineError(f"{self.engine.name} cannot segment a whole image: {exc}") from exc

    def _embed(self, image: ImageHandle) -> ImageState:
        """Load the pixels (a cache miss) and embed them, checking that the image is still the same."""
        decoded = image.load()
        if decoded.sha256 != image.sha256:
            raise ImageChangedError(f"{image.uri}: content changed (sha256 {decoded.sha256[:12]}…)")
        return self.engine.embed(np.asarray(decoded.array), decoded.sha256)


def make_segmenter_client(
    settings: Settings, *, cache_bytes: int = 1024 * 1024 * 1024, max_versions: int = 4
) -> SegmenterClient:
    """The segmenter the backend should use, from ``SEEMLY_SEGMENTER_URL``.

    Unset: the configured engine in this process (:class:`InProcessSegmenter`). Set: the Ray Serve
    segmenter (``backend.serve_client.ServeSegmenter``, HTTP or handle). A service that is down is
    logged now with how to start it, and every request answers 503 with the same message until it is
    up (the backend itself starts anyway, so that Label Studio can reach /health).
    """
    if not settings.segmenter_url:
        from seemly.engines.base import configured_engine_spec, create_engine

        name, options = configured_engine_spec(settings)
        return InProcessSegmenter(
            create_engine(name, **options),
            cache_bytes=cache_bytes,
            max_versions=max_versions,
            device=settings.device,
        )
    from backend.serve_client import ServeSegmenter

    client = ServeSegmenter(
        settings.segmenter_url, timeout_s=settings.segmenter_timeout_s, ray_address=settings.ray_address
    )
    problem = client.probe()
    if problem is None:
        log.info(
            "segmenting with the Serve segmenter at %s (model %s)",
            settings.segmenter_url,
            client.model_version,
        )
    else:
        log.error("%s", problem)
    return client
