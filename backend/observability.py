"""The backend's request ids, Prometheus metrics and deep health check, wired into the Flask app.

:func:`install` registers the per-request hooks (they run before authentication, so a refused
request has an id and is counted too) and the two routes:

``GET /metrics``
    Prometheus text (or OpenMetrics) when the caller asks for it — ``Accept: text/plain`` or
    ``application/openmetrics-text``, as Prometheus does, or ``?format=prometheus`` — else the JSON
    counters this route has always answered. Families: :mod:`seemly.metrics`, :mod:`seemly.metrics_db`.
``GET /health/deep``
    Every dependency checked with a deadline (:mod:`backend.health`): 200 when all are ok, 503 naming
    the failed components otherwise.

Both sit behind the backend's basic auth unless ``SEEMLY_METRICS_PUBLIC=true``.

The interactive-round histogram needs the prompt kinds the round used; :func:`note_round` is the
hook :mod:`backend.predict` calls once it has parsed them (a no-op outside a request).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, jsonify, request

from backend import logs
from backend.errors import from_exception
from seemly.log_setup import REQUEST_ID
from seemly.metrics import BackendMetrics, CacheCollector, ValuesCollector, outcome_of, prometheus_requested
from seemly.metrics_db import DatabaseCollector

if TYPE_CHECKING:
    from backend.app import Backend

PUBLIC_PATHS = ("/metrics", "/health/deep")

_ROUND_KINDS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "seemly_round_kinds", default=None
)


def note_round(kinds: Iterable[str]) -> None:
    """Record the prompt kinds of the round being served (for the latency histogram's label)."""
    current = _ROUND_KINDS.get()
    if current is not None:
        current.update(kinds)


def build_metrics(backend: Backend) -> BackendMetrics:
    """The backend's registry: its own families plus collectors reading live counters and the DB."""
    metrics = BackendMetrics()
    segmenter = backend.segmenter
    metrics.add(
        CacheCollector(
            lambda: getattr(segmenter, "stats", None), lambda: getattr(segmenter, "cached_bytes", None)
        )
    )
    metrics.add(ValuesCollector(lambda: _live_values(backend)))
    settings = backend.settings
    metrics.add(
        DatabaseCollector(
            backend.db, timeout_s=settings.metrics_db_timeout_s, cache_s=settings.metrics_db_cache_s
        )
    )
    return metrics


def _live_values(backend: Backend) -> dict[str, tuple[str, str, float]]:
    history = backend.history.stats
    return {
        "seemly_sessions": ("gauge", "Interactive prompt sessions held in memory.", len(backend.sessions)),
        "seemly_image_fetches": ("counter", "Images downloaded and decoded.", backend.fetcher.fetches),
        "seemly_history_submitted": ("counter", "Records queued for the history writer.", history.submitted),
        "seemly_history_written": ("counter", "Records the history writer stored.", history.written),
        "seemly_history_failed": ("counter", "Records the history writer could not store.", history.failed),
        "seemly_history_dropped": ("counter", "Records refused because the queue was full.", history.dropped),
        "seemly_uptime_seconds": (
            "gauge",
            "Seconds since this backend started.",
            time.time() - backend.started,
        ),
    }


def _endpoint() -> str:
    """The matched route (bounded: never the raw path, which a caller chooses)."""
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def _interactive(data: Any) -> bool:
    params = data.get("params") if isinstance(data, dict) else None
    return isinstance(params, dict) and bool(params.get("context"))


def install(app: Flask, backend: Backend, json_metrics: Callable[[], dict[str, Any]]) -> None:
    """Hooks and routes (module doc); call before the authentication hook is registered."""
    metrics = backend.metrics

    @app.before_request
    def _bind_request_id() -> None:
        g.request_id = logs.request_id_for(request.headers.get(logs.REQUEST_ID_HEADER))
        g.request_id_token = REQUEST_ID.set(g.request_id)
        g.round_kinds_token = _ROUND_KINDS.set(set())
        g.observed_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers[logs.REQUEST_ID_HEADER] = request_id
        started = g.get("observed_started")
        if started is not None:
            metrics.observe_request(_endpoint(), response.status_code, time.perf_counter() - started)
        return response

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        for var, name in ((REQUEST_ID, "request_id_token"), (_ROUND_KINDS, "round_kinds_token")):
            token = g.pop(name, None)
            if token is not None:
                try:
                    var.reset(token)
                except ValueError:  # set in another context (cannot happen with Flask's threads)
                    var.set(None)

    @app.route("/metrics", methods=["GET"])
    def metrics_route() -> Response:
        if prometheus_requested(request.headers.get("Accept"), request.args.get("format")):
            payload, content_type = metrics.render(request.headers.get("Accept"))
            return Response(payload, status=200, content_type=content_type)
        return jsonify(json_metrics())

    @app.route("/health/deep", methods=["GET"])
    def deep_health_route() -> tuple[Response, int]:
        from backend.health import deep_health

        body, status = deep_health(backend.settings, backend.db, backend.segmenter)
        return jsonify(body), status


def observe_predict(backend: Backend, data: Any, run: Callable[[], Any]) -> Any:
    """Run a ``/predict`` and, for an interactive round, record its latency in the histogram."""
    if not _interactive(data):
        return run()
    started = time.perf_counter()
    status = 500
    answered_version: str | None = None
    try:
        result = run()
        status = 200
        results = result.get("results") if isinstance(result, dict) else None
        if results and isinstance(results[0], dict):
            answered_version = results[0].get("model_version")
        answered_version = answered_version or (
            result.get("model_version") if isinstance(result, dict) else None
        )
        return result
    except Exception as exc:
        error = from_exception(exc)
        status = error.status if error is not None else 500
        raise
    finally:
        kinds = _ROUND_KINDS.get() or set()
        backend.metrics.observe_round(
            engine=backend.engine_name,
            model_version=str(answered_version or backend.segmenter.model_version),
            prompt_kinds=kinds,
            outcome=outcome_of(status),
            seconds=time.perf_counter() - started,
        )
