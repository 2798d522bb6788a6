"""Prometheus metrics: every metric family seemly exposes is named and described here, once.

Two exporters share these definitions:

* the **backend** owns a :class:`BackendMetrics` (its own ``CollectorRegistry``, not the process-wide
  default: each app counts only its own requests, and tests can build several apps in one process)
  and serves it at ``GET /metrics``;
* the **Ray Serve replicas** (``workers/serve_metrics.py``) build ``ray.serve.metrics`` objects from
  :data:`SERVE_FAMILIES`, which Ray's metrics agent exports (prefixed ``ray_``) next to Serve's own.

Counters that already exist elsewhere (the embedding cache's :class:`~seemly.embed_cache.CacheStats`,
the history writer's counters) are *read* at scrape time by a collector rather than mirrored, so there
is one source of truth. Database-derived metrics live in :mod:`seemly.metrics_db`.
The names, labels and meaning of each family are listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from seemly.embed_cache import CacheStats

#: Interactive round latency buckets (seconds): a click should answer in well under a second; a first
#: round pays for the embed (SAM on a CPU: seconds).
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

ROUND_SECONDS = "seemly_predict_round_seconds"
HTTP_REQUESTS = "seemly_http_requests"
HTTP_SECONDS = "seemly_http_request_seconds"
CACHE_PREFIX = "seemly_embed_cache"


@dataclass(frozen=True)
class Family:
    """One metric family of the Serve replicas (built with ``ray.serve.metrics`` by the workers)."""

    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


#: The Serve replicas' own families. Ray adds ``deployment``, ``replica`` and ``application`` tags and
#: exports each as ``ray_<name>``.
SERVE_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "seemly_serve_segment_seconds",
            "histogram",
            "Time one Segmenter call took inside the replica (embed on a miss + segment + encode).",
            ("model_version", "kind", "outcome"),
            ROUND_BUCKETS,
        ),
        Family("seemly_serve_embed_cache_hits", "counter", "Segment calls whose image state was cached."),
        Family("seemly_serve_embed_cache_misses", "counter", "Segment calls that had to embed the image."),
        Family("seemly_serve_embed_cache_evictions", "counter", "Image states evicted to fit the budget."),
        Family("seemly_serve_embed_cache_bytes", "gauge", "Bytes of image states held by the replica."),
    )
}


def status_class(status: int) -> str:
    """``2xx`` / ``4xx`` / ``5xx`` ... (a bounded label, unlike the status itself)."""
    return f"{max(1, min(5, status // 100))}xx"


def outcome_of(status: int) -> str:
    """``ok`` / ``client_error`` / ``error`` for a round that answered ``status``."""
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "error"


class CacheCollector(Collector):
    """Reads an embedding cache's counters at scrape time (``stats`` returns None: no cache here)."""

    def __init__(
        self, stats: Callable[[], CacheStats | None], cached_bytes: Callable[[], int | None]
    ) -> None:
        self._stats = stats
        self._bytes = cached_bytes

    def describe(self) -> Iterable[Metric]:
        return []  # values are only known at scrape time; nothing to register in advance

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        for what, value, help_text in (
            ("hits", stats.hits, "Rounds whose image embedding was already cached."),
            ("misses", stats.misses, "Rounds that had to embed the image (first round, evicted)."),
            ("evictions", stats.evictions, "Image embeddings evicted to fit the memory budget."),
            ("embed_seconds", stats.embed_seconds, "Time spent embedding images on cache misses."),
        ):
            family = CounterMetricFamily(f"{CACHE_PREFIX}_{what}", help_text)
            family.add_metric([], float(value))
            yield family
        total = stats.hits + stats.misses
        ratio = GaugeMetricFamily(
            f"{CACHE_PREFIX}_hit_ratio", "hits / (hits + misses) since start (NaN before any round)."
        )
        ratio.add_metric([], stats.hits / total if total else float("nan"))
        yield ratio
        held = self._bytes()
        if held is not None:
            gauge = GaugeMetricFamily(f"{CACHE_PREFIX}_bytes", "Bytes of image embeddings held.")
            gauge.add_metric([], float(held))
            yield gauge


class ValuesCollector(Collector):
    """Plain numbers read at scrape time: ``values()`` returns ``{name: (kind, help, value)}``."""

    def __init__(self, values: Callable[[], dict[str, tuple[str, str, float]]]) -> None:
        self._values = values

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for name, (kind, help_text, value) in self._values().items():
            family: Metric = (
                CounterMetricFamily(name, help_text)
                if kind == "counter"
                else GaugeMetricFamily(name, help_text)
            )
            family.add_metric([], float(value))  # type: ignore[attr-defined]
            yield family


class BackendMetrics:
    """The backend's metric families, in a registry of its own (see the module doc)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.round_seconds = Histogram(
            ROUND_SECONDS,
            "Interactive /predict rounds: time from request to answer, by engine, model version, "
            "prompt kinds (sorted, '+'-joined) and outcome (ok | client_error | error).",
            ("engine", "model_version", "prompt_kinds", "outcome"),
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            HTTP_REQUESTS,
            "Backend HTTP requests by route and status class.",
            ("endpoint", "status_class"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            HTTP_SECONDS,
            "Backend HTTP request duration by route.",
            ("endpoint",),
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, status_class(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def observe_round(
        self, *, engine: str, model_version: str, prompt_kinds: Iterable[str], outcome: str, seconds: float
    ) -> None:
        kinds = "+".join(sorted(set(prompt_kinds))) or "none"
        self.round_seconds.labels(engine, model_version, kinds, outcome).observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks for it) and its type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def prometheus_requested(accept: str | None, query_format: str | None) -> bool:
    """Whether a ``/metrics`` caller wants the Prometheus exposition rather than the legacy JSON.

    ``?format=prometheus|json`` decides when given; otherwise an ``Accept`` header naming
    ``text/plain`` or ``application/openmetrics-text`` (what Prometheus sends) does.
    """
    if query_format:
        return query_format.lower() in ("prometheus", "text", "openmetrics")
    header = (accept or "").lower()
    return "text/plain" in header or "application/openmetrics-text" in header
