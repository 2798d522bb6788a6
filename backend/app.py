"""The Label Studio ML backend as a Flask app: routes, authentication, body limits, error answers.

Routes (label-studio-ml's contract, see :mod:`backend.compat`):

=================  ===========================================================================
``GET /health``    ``{"status": "UP", ...}`` from memory (Label Studio allows 1 s); also ``GET /``
``POST /setup``    validates the labeling config, keeps Label Studio's URL + token, persists them
                   in the ``projects`` row; answers ``{"model_version": ...}``, the project's
                   promoted version (no model loading)
``POST /predict``  interactive (``params.context``) or batch; :mod:`backend.predict`
``POST /webhook``  annotation events and ``START_TRAINING``; :mod:`backend.webhooks`
``POST /train``    the pre-1.4 training call, recorded like ``START_TRAINING``
``/versions``      the project's (``?project=`` or body ``project``) served version first, then its
                   other registered versions and the base engine
``GET /metrics``   Prometheus metrics when asked for them (``Accept: text/plain``), else the JSON
                   cache, session and history-writer counters (no secrets); :mod:`backend.observability`
``GET /health/deep`` every dependency checked with a deadline: 200 or 503 (:mod:`backend.health`)
=================  ===========================================================================

Every failure is JSON ``{"error": "..."}`` with a 4xx status for client mistakes (see
:mod:`backend.errors`). Bodies are read by hand: at most ``SEEMLY_MAX_REQUEST_BYTES`` (413 past it,
also for chunked bodies), parsed as JSON whatever the Content-Type says (400 if malformed).
Optional HTTP basic auth (``SEEMLY_BACKEND_BASIC_AUTH_USER`` / ``..._PASSWORD``) guards every route;
Label Studio sends it when the ML backend URL is ``http://user:pass@host:9090``
(``SEEMLY_METRICS_PUBLIC=true`` exempts ``/metrics`` and ``/health/deep``). Every request has an id
(``X-Request-ID``, echoed) that every log line made while serving it carries.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from werkzeug.exceptions import HTTPException

from backend import compat, logs, observability
from backend.errors import ApiError, from_exception
from backend.fetch import ImageFetcher
from backend.history import HistoryWriter, TrainingRequestRecord, WriterContext
from backend.ls_format import ls_project_id
from backend.predict import Predictor
from backend.projects import ProjectRegistry
from backend.segmenter import SegmenterClient, make_segmenter_client
from backend.sessions import SessionStore
from backend.versions import ProjectVersions
from backend.webhooks import TRAINING_NOTE, WebhookHandler
from seemly.config import Settings, get_settings
from seemly.db.session import make_engine
from seemly.engines.semantic import ProjectSemantics, clip_from_settings
from seemly.metrics import BackendMetrics
from seemly.prompts import PromptError
from seemly.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class BackendOptions:
    """Tuning of one backend process (CLI flags; defaults suit one annotation team)."""

    embed_cache_mb: int = 1024
    max_sessions: int = 2000
    session_idle_seconds: float = 3600.0
    history_queue: int = 10_000
    max_loaded_versions: int = 4
    """Model versions (per-project fine-tunes) loaded side by side in the in-process segmenter."""
    warm_up: bool = True
    """Import the lazily loaded codecs and run the engine once on a tiny image in a background thread
    at start-up, so the first annotator's click does not pay for it (about 1.5 s on CPU)."""


@dataclass
class Backend:
    """Everything one app owns; nothing here is process-global."""

    settings: Settings
    db: Engine
    storage: Storage
    segmenter: SegmenterClient
    fetcher: ImageFetcher
    sessions: SessionStore
    projects: ProjectRegistry
    history: HistoryWriter
    predictor: Predictor
    webhooks: WebhookHandler
    versions: ProjectVersions
    started: float = field(default_factory=time.time)
    metrics: BackendMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = observability.build_metrics(self)

    @property
    def engine_name(self) -> str:
        return _engine_name(self.segmenter, self.settings)

    def secrets(self) -> Iterable[str]:
        """Every secret this process knows, for log redaction."""
        s = self.settings
        for value in (
            s.label_studio_api_key,
            s.backend_basic_auth_password,
            s.s3_secret_access_key,
            s.s3_access_key_id,
        ):
            if value is not None:
                yield value.get_secret_value()
        try:
            password = make_url(s.database_url).password
        except (ArgumentError, ValueError):
            password = None
        if password:
            yield str(password)
        yield from list(self.projects.secrets)

    def warm_up(self) -> None:
        """Load what the first interactive request would otherwise load (see ``BackendOptions.warm_up``)."""
        started = time.perf_counter()
        try:
            import numpy as np

            from seemly.masks import Mask
            from seemly.prompts import PromptRound
            from seemly.text_labels import preload_in_background

            preload_in_background()  # the sentence-embedding model for free-text prompts (5-15 s)
            Mask.full(4, 4).to_ls_brush_rle()  # imports label_studio_sdk.converter (~1.3 s)
            Mask.full(4, 4).to_polygons()
            engine = getattr(self.segmenter, "engine", None)
            if engine is not None:  # the engine itself, not the cache: stats and budget stay untouched
                image = np.zeros((32, 32, 3), np.uint8)
                image[8:24, 8:24] = 200
                state = engine.embed(image, "0" * 64)
                engine.segment(
                    state, PromptRound.model_validate({"prompts": [{"kind": "click", "x": 16, "y": 16}]})
                )
        except Exception:  # warming up is an optimisation: never fatal
            log.warning("warm-up failed", exc_info=True)
        else:
            log.debug("warmed up in %.2f s", time.perf_counter() - started)

    def close(self) -> None:
        """Write the queued history, stop the writer thread and close database connections."""
        self.history.close()
        self.db.dispose()


def _engine_name(segmenter: SegmenterClient, settings: Settings) -> str:
    engine = getattr(segmenter, "engine", None)
    return str(getattr(engine, "name", settings.engine))


def build_backend(
    settings: Settings | None = None,
    *,
    options: BackendOptions | None = None,
    db: Engine | None = None,
    storage: Storage | None = None,
    segmenter: SegmenterClient | None = None,
) -> Backend:
    """Wire the components (cheap: no image is read and no model is run here)."""
    settings = settings or get_settings()
    options = options or BackendOptions()
    db = db or make_engine(settings.database_url)
    storage = storage or Storage.from_settings(settings)
    if segmenter is None:
        # In this process by default; the Ray Serve segmenter when SEEMLY_SEGMENTER_URL is set.
        segmenter = make_segmenter_client(
            settings,
            cache_bytes=options.embed_cache_mb * 1024 * 1024,
            max_versions=options.max_loaded_versions,
        )
    fetcher = ImageFetcher(storage, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
    sessions = SessionStore(max_sessions=options.max_sessions, idle_seconds=options.session_idle_seconds)
    projects = ProjectRegistry(db, storage, settings)
    history = HistoryWriter(
        db,
        WriterContext(fetcher, projects.parse, _engine_name(segmenter, settings)),
        max_queue=options.history_queue,
    )
    versions = ProjectVersions(db, settings.version_refresh_s)
    clip = clip_from_settings(settings, storage)  # a bad SEEMLY_CLIP_CHECKPOINT stops the start, with why
    semantic = (
        ProjectSemantics(db, fetcher.storage, image_loader=lambda uri: fetcher.load(uri).array, clip=clip)
        if clip is not None
        else None
    )
    predictor = Predictor(
        segmenter=segmenter,
        fetcher=fetcher,
        sessions=sessions,
        projects=projects,
        history=history,
        db=db,
        versions=versions,
        semantic=semantic,
    )
    return Backend(
        settings=settings,
        db=db,
        storage=storage,
        segmenter=segmenter,
        fetcher=fetcher,
        sessions=sessions,
        projects=projects,
        history=history,
        predictor=predictor,
        webhooks=WebhookHandler(history, sessions, projects),
        versions=versions,
    )


def backend_of(app: Flask) -> Backend:
    return app.extensions["seemly"]


def create_app(
    settings: Settings | None = None,
    *,
    options: BackendOptions | None = None,
    db: Engine | None = None,
    storage: Storage | None = None,
    segmenter: SegmenterClient | None = None,
) -> Flask:
    """The WSGI app; ``backend_of(app)`` gives its components (tests flush the history through it)."""
    backend = build_backend(settings, options=options, db=db, storage=storage, segmenter=segmenter)
    settings = backend.settings
    app = Flask("seemly_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["seemly"] = backend
    logs.install(backend.secrets)
    if (options or BackendOptions()).warm_up:
        threading.Thread(target=backend.warm_up, name="seemly-warm-up", daemon=True).start()

    auth_user = settings.backend_basic_auth_user
    auth_password = settings.backend_basic_auth_password
    if bool(auth_user) != bool(auth_password):
        raise ValueError(
            "set both SEEMLY_BACKEND_BASIC_AUTH_USER and SEEMLY_BACKEND_BASIC_AUTH_PASSWORD, or neither"
        )

    # --- request plumbing ----------------------------------------------------------------------

    observability.install(app, backend, lambda: json_metrics())
    public = observability.PUBLIC_PATHS if settings.metrics_public else ()

    @app.before_request
    def _start() -> Response | None:
        g.started = time.perf_counter()
        if auth_user and auth_password and request.path not in public:
            given = request.authorization
            ok = (
                given is not None
                and given.type == "basic"
                and hmac.compare_digest((given.username or "").encode(), auth_user.encode())
                and hmac.compare_digest(
                    (given.password or "").encode(), auth_password.get_secret_value().encode()
                )
            )
            if not ok:
                response = jsonify(error="authentication required: this ML backend uses HTTP basic auth")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Basic realm="seemly ML backend"'
                return response
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000.0
        response.headers["X-Seemly-Elapsed-Ms"] = f"{elapsed:.1f}"
        log.debug("%s %s -> %s in %.1f ms", request.method, request.path, response.status_code, elapsed)
        return response

    def body() -> dict[str, Any]:
        limit = settings.max_request_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise ApiError(
                413,
                f"the request body is {declared} bytes, over the limit of {limit} (SEEMLY_MAX_REQUEST_BYTES)",
            )
        data = request.stream.read(limit + 1)
        if len(data) > limit:
            raise ApiError(
                413, f"the request body is over the limit of {limit} bytes (SEEMLY_MAX_REQUEST_BYTES)"
            )
        if not data.strip():
            raise ApiError(400, "the request body is empty: expected a JSON object")
        try:
            parsed = json.loads(data)
        except UnicodeDecodeError:
            raise ApiError(400, "malformed JSON: the body is not UTF-8 text") from None
        except ValueError as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, f"expected a JSON object, got a JSON {type(parsed).__name__}")
        return parsed

    @app.errorhandler(Exception)
    def _error(exc: Exception) -> tuple[Response, int]:
        error = from_exception(exc)
        if error is None and isinstance(exc, HTTPException):
            code = exc.code or 500
            if code == 413:
                error = ApiError(
                    413, f"the request body is over the limit of {settings.max_request_bytes} bytes"
                )
            else:
                error = ApiError(code, f"{exc.name}: {exc.description}")
        if error is None and isinstance(exc, SQLAlchemyError):
            log.warning("database error on %s %s: %s", request.method, request.path, type(exc).__name__)
            error = ApiError(503, "the seemly database is unavailable; try again")
        if error is None:
            log.exception("unexpected error on %s %s", request.method, request.path)
            error = ApiError(500, "internal error in the seemly backend (details are in its log)")
        elif error.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.path, error.status, error.message)
        else:
            log.info("%s %s -> %s: %s", request.method, request.path, error.status, error.message)
        return jsonify(error.body()), error.status

    # --- routes ----------------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health() -> Response:
        return jsonify(compat.health_body(backend.segmenter.model_version))

    @app.route("/setup", methods=["POST"])
    def setup() -> Response:
        data = body()
        project = ls_project_id(data.get("project"))
        schema = data.get("schema", data.get("label_config"))
        if not isinstance(schema, str) or not schema.strip():
            raise PromptError("schema", "the labeling config (schema) is missing")
        hostname = data.get("hostname") or None
        token = data.get("access_token") or None
        if hostname is not None and not isinstance(hostname, str):
            raise PromptError("hostname", "must be Label Studio's URL as a string")
        if token is not None and not isinstance(token, str):
            raise PromptError("access_token", "must be a string")
        backend.projects.setup(project, schema, hostname, token, data.get("extra_params"))
        return jsonify(compat.setup_body(backend.predictor.segmenter_for(project).model_version))

    @app.route("/predict", methods=["POST"])
    def predict() -> Response:
        data = body()
        return jsonify(observability.observe_predict(backend, data, lambda: backend.predictor.predict(data)))

    @app.route("/webhook", methods=["POST"])
    def webhook() -> Response:
        return jsonify(backend.webhooks.handle(body()))

    @app.route("/train", methods=["POST"])
    def train() -> Response:
        data = body()
        project = ls_project_id(data.get("project"))
        if not backend.history.submit(TrainingRequestRecord(ls_project_id=project)):
            raise ApiError(503, "the history writer is overloaded; try again")
        return jsonify({"status": "ok", "training": "requested", "detail": TRAINING_NOTE})

    @app.route("/versions", methods=["GET", "POST"])
    def versions() -> Response:
        given: Any = request.args.get("project")
        if given is None and request.method == "POST" and request.content_length:
            given = body().get("project")
        if given is None:  # no project: what a project without a promoted version gets
            return jsonify(compat.versions_body(backend.segmenter.model_version))
        project = ls_project_id(given)
        served = backend.predictor.segmenter_for(project).model_version
        names = [v.name for v in backend.versions.project_versions(project)]
        others = [n for n in [*names, backend.segmenter.model_version] if n != served]
        return jsonify(compat.versions_body(served, others))

    def json_metrics() -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_version": backend.segmenter.model_version,
            "sessions": len(backend.sessions),
            "image_fetches": backend.fetcher.fetches,
            "history": vars(backend.history.stats),
            "uptime_s": round(time.time() - backend.started, 1),
        }
        stats = getattr(backend.segmenter, "stats", None)
        if stats is not None:
            out["embed_cache"] = {**vars(stats), "bytes": getattr(backend.segmenter, "cached_bytes", None)}
        return out

    return app
