"""The embedding cache shared by every process that runs an engine interactively.

``Engine.embed`` is the expensive half of a round (SAM's ``set_image``); an annotator's second,
third ... round on the same image must reuse its result. :class:`EmbedCache` keeps
:class:`~seemly.engines.base.ImageState` objects keyed by ``(image sha256, model version)``:

* **memory budget, LRU**: entries are measured with ``ImageState.nbytes()`` after every use (engine
  states grow per click, e.g. the classic engine's geodesic cache) and the least recently used ones
  are evicted until the total fits ``cache_bytes``. A single state larger than the whole budget is
  kept until the next one replaces it (otherwise nothing could be served);
* **single flight**: concurrent first requests for one image embed it once; the others wait on the
  entry's lock and then hit;
* **one user per state**: :meth:`EmbedCache.use` holds the entry's lock for the duration of the
  caller's engine call, because engine states keep small per-image caches that are not thread-safe.
  Different images run in parallel.

It is used by the backend's in-process segmenter (``backend.segmenter.InProcessSegmenter``) and by
the Ray Serve ``Segmenter`` replicas (``workers.serve``). Nothing here knows about Ray or HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from seemly.engines.base import ImageState

log = logging.getLogger(__name__)

CacheKey = tuple[str, str]  # (image sha256, model version)


@dataclass
class CacheStats:
    """Counters since the cache was made (``embed_seconds``: time spent in ``embed`` on misses)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    embed_seconds: float = 0.0


@dataclass
class _Entry:
    state: ImageState | None = None  # None while the first embed is in flight
    nbytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class EmbedCache:
    """LRU of image states within a memory budget, with single-flight embeds (see module doc)."""

    def __init__(self, cache_bytes: int = 1024 * 1024 * 1024) -> None:
        if cache_bytes < 1:
            raise ValueError("cache_bytes must be positive")
        self._cache_bytes = int(cache_bytes)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._used = 0

    # --- inspection --------------------------------------------------------------------------------
    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.state is not None)

    def contains(self, sha256: str, model_version: str) -> bool:
        """Whether a finished state is cached (an embed in flight does not count)."""
        with self._lock:
            entry = self._entries.get((sha256, model_version))
            return entry is not None and entry.state is not None

    # --- configuration -----------------------------------------------------------------------------
    def resize(self, cache_bytes: int) -> None:
        """Change the budget now (evicting least recently used entries if it shrank)."""
        if cache_bytes < 1:
            raise ValueError("cache_bytes must be positive")
        with self._lock:
            self._cache_bytes = int(cache_bytes)
            self._evict_locked(keep=None)

    def clear(self) -> None:
        """Drop every finished state (embeds in flight finish and are cached as usual)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.state is not None]:
                self._used -= self._entries.pop(key).nbytes

    # --- the one entry point -------------------------------------------------------------------------
    @contextmanager
    def use(
        self, sha256: str, model_version: str, embed: Callable[[], ImageState]
    ) -> Iterator[tuple[ImageState, bool]]:
        """Hold the state of ``(sha256, model_version)`` for one engine call: yields ``(state, hit)``.

        On a miss ``embed()`` is called (with the entry's lock held: one embed per image, however many
        requests ask at once). If it raises, nothing is cached and the error propagates. On exit the
        entry is re-measured and the cache trimmed to its budget.
        """
        key = (sha256, model_version)
        entry = self._entry(key)
        with entry.lock:
            state, hit = self._ensure_state(key, entry, embed)
            try:
                yield state, hit
            finally:
                self._account(key, entry)

    # --- internals -----------------------------------------------------------------------------------
    def _entry(self, key: CacheKey) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry()
                self._entries[key] = entry
            self._entries.move_to_end(key)
            return entry

    def _ensure_state(
        self, key: CacheKey, entry: _Entry, embed: Callable[[], ImageState]
    ) -> tuple[ImageState, bool]:
        if entry.state is not None:
            with self._lock:
                self.stats.hits += 1
            return entry.state, True
        started = time.perf_counter()
        try:
            state = embed()
        except BaseException:
            self._discard_empty(key, entry)
            raise
        elapsed = time.perf_counter() - started
        entry.state = state
        with self._lock:
            self.stats.misses += 1
            self.stats.embed_seconds += elapsed
        log.debug("embedded %s… (%s) in %.3f s", key[0][:12], key[1], elapsed)
        return state, False

    def _discard_empty(self, key: CacheKey, entry: _Entry) -> None:
        """Drop a placeholder whose embed failed, so failed images do not pile up in the map."""
        with self._lock:
            if self._entries.get(key) is entry and entry.state is None:
                del self._entries[key]

    def _account(self, key: CacheKey, entry: _Entry) -> None:
        """Re-measure an entry (engine states grow per click) and evict least recently used ones."""
        try:
            size = entry.state.nbytes() if entry.state is not None else 0
        except Exception:  # an engine's size estimate must never fail a request
            log.debug("cannot measure an image state", exc_info=True)
            size = entry.nbytes
        with self._lock:
            if self._entries.get(key) is not entry:  # evicted meanwhile: nothing to account
                return
            self._used += size - entry.nbytes
            entry.nbytes = size
            self._evict_locked(keep=key)

    def _evict_locked(self, keep: CacheKey | None) -> None:
        for other_key in list(self._entries):
            if self._used <= self._cache_bytes:
                break
            if other_key == keep:
                continue
            other = self._entries[other_key]
            if other.state is None:  # an embed in flight; its owner accounts for it later
                continue
            del self._entries[other_key]
            self._used -= other.nbytes
            self.stats.evictions += 1
        # A single state larger than the budget is kept until the next one replaces it.
