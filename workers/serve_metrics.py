"""The Serve replicas' Prometheus metrics, built with ``ray.serve.metrics`` from :data:`seemly.metrics.SERVE_FAMILIES`.

Ray exports them through its metrics agent (``ray_<name>``, with ``deployment``/``replica``/
``application`` tags added by Serve) next to Serve's own ``ray_serve_*`` metrics; scrape the Ray
nodes' metrics port (docs/operations.md). The embedding cache keeps cumulative
:class:`~seemly.embed_cache.CacheStats`; :meth:`ReplicaMetrics.sync_cache` turns them into counter
increments (Ray counters only take increments).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from seemly.embed_cache import CacheStats, EmbedCache
from seemly.metrics import SERVE_FAMILIES

log = logging.getLogger(__name__)

_CACHE_COUNTERS = (
    ("hits", "seemly_serve_embed_cache_hits"),
    ("misses", "seemly_serve_embed_cache_misses"),
    ("evictions", "seemly_serve_embed_cache_evictions"),
)


def _build(name: str) -> Any:
    from ray.serve import metrics as serve_metrics

    family = SERVE_FAMILIES[name]
    tags = family.tag_keys or None
    if family.kind == "histogram":
        return serve_metrics.Histogram(
            family.name, description=family.description, boundaries=list(family.boundaries), tag_keys=tags
        )
    if family.kind == "counter":
        return serve_metrics.Counter(family.name, description=family.description, tag_keys=tags)
    return serve_metrics.Gauge(family.name, description=family.description, tag_keys=tags)


class ReplicaMetrics:
    """One replica's metric objects. A failure to record is logged once, never raised into a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen = CacheStats()
        self._warned = False
        self.segment_seconds = _build("seemly_serve_segment_seconds")
        self._counters = {what: _build(name) for what, name in _CACHE_COUNTERS}
        self._bytes = _build("seemly_serve_embed_cache_bytes")

    def _failed(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("recording Serve metrics failed (%s); serving goes on", exc)

    def observe(self, *, model_version: str, kind: str, outcome: str, seconds: float) -> None:
        try:
            self.segment_seconds.observe(
                seconds, tags={"model_version": model_version, "kind": kind, "outcome": outcome}
            )
        except Exception as exc:
            self._failed(exc)

    def sync_cache(self, cache: EmbedCache) -> None:
        """Add what the cache counted since the last call; set the bytes gauge."""
        try:
            with self._lock:
                stats = cache.stats
                for what, _name in _CACHE_COUNTERS:
                    delta = getattr(stats, what) - getattr(self._seen, what)
                    if delta > 0:
                        self._counters[what].inc(delta)
                self._seen = CacheStats(stats.hits, stats.misses, stats.evictions, stats.embed_seconds)
            self._bytes.set(cache.cached_bytes)
        except Exception as exc:
            self._failed(exc)
