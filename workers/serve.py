"""The interactive segmenter as a Ray Serve application: ``workers.serve:build_app``.

Two deployments (design and measurements: docs/serve.md):

``Segmenter``
    Runs the configured engine. Each replica keeps an :class:`seemly.embed_cache.EmbedCache` of
    image states per (sha256, model version) within a memory budget, so an annotator's 2nd, 3rd ...
    round only pays for ``segment``. Calls carry the image's sha256 as a keyword argument and the
    :class:`workers.serve_router.ImageAffinityRouter` sends all calls for one image to the same
    replica (rendezvous hashing). A call without pixels on an image this replica has not embedded
    answers ``need_image`` and the client repeats it with the pixels (the backend owns the Label
    Studio tokens, so the service never fetches images). Embeds of concurrent first rounds go
    through one ``@serve.batch`` (an engine with ``embed_batch`` receives the list; others embed
    each image, in ``embed_threads`` parallel threads). Model versions are multiplexed
    (``@serve.multiplexed``): a call names its version with
    ``handle.options(multiplexed_model_id=...)``; none means the *promoted* version of the live
    config, which ``reconfigure`` switches without restarting a replica.

``SegmenterIngress``
    The HTTP face (route prefix ``/segment`` in infra/serve/segmenter.yaml): JSON in the wire format
    of :mod:`seemly.serving`, forwarded to ``Segmenter`` through a handle, with a timeout and a retry
    when a replica dies under a request.

``build_app(args)`` takes :class:`AppArgs` (a Serve config's ``args:``, or ``seemly serve`` flags);
defaults come from the ``SEEMLY_*`` settings of the process that builds the app. The live part of
the configuration (:class:`SegmenterConfig`: promoted version, versions, cache budget, batching) is
the ``Segmenter``'s ``user_config`` and can be changed in place (``seemly serve --promote``).
"""

# No ``from __future__ import annotations`` here: Serve's FastAPI ingress needs the real ``Request``
# annotation objects on the route methods.
import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request

from seemly.config import get_settings
from seemly.embed_cache import EmbedCache
from seemly.engines.base import (
    Engine,
    EngineError,
    ImageState,
    Segment,
    UnsupportedPromptError,
    create_engine,
)
from seemly.learning.loading import VersionedEngine, load_version
from seemly.log_setup import bind_request_id, install_request_ids, sane_request_id
from seemly.masks import MaskError
from seemly.prompts import PromptError
from seemly.serving import (
    ERROR_STATUS,
    ImageRef,
    PrefetchRequest,
    SegmentAnswer,
    SegmentRequest,
    WireError,
    WireImage,
    WireSegment,
)
from workers.serve_metrics import ReplicaMetrics

log = logging.getLogger(__name__)

APP_NAME = "segmenter"
ROUTE_PREFIX = "/segment"
SEGMENTER = "Segmenter"
INGRESS = "SegmenterIngress"
MAX_MODELS_PER_REPLICA = 4  # model versions loaded side by side in one replica (LRU beyond)
REPLICA_THREADS = 16  # request threads per replica (>= max_ongoing_requests: a waiting call holds one)


class UnknownVersionError(EngineError):
    """A request named a model version this deployment does not know."""


class _NeedImage(Exception):
    """The image is not cached here and the request carried no pixels."""


# --- configuration ------------------------------------------------------------------------------
class VersionSpec(BaseModel):
    """How to build one model version: a registered engine and its options."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(description="registered engine name (classic | sam | sam2 ...)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="create_engine options (checkpoint, device)"
    )
    synthetic_embed_s: float = Field(
        default=0.0,
        ge=0,
        description="BENCHMARKS ONLY: make every embed take at least this long (a sleep after the real "
        "embed) to stand in for an embed-heavy engine such as SAM ViT-B on a CPU",
    )


class SegmenterConfig(BaseModel):
    """The live configuration of every ``Segmenter`` replica (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    engine: str | None = Field(default=None, description="base engine; None = SEEMLY_ENGINE")
    engine_options: dict[str, Any] | None = Field(
        default=None, description="base engine options; None = SEEMLY_ENGINE_CHECKPOINT / SEEMLY_DEVICE"
    )
    versions: dict[str, VersionSpec] = Field(
        default_factory=dict,
        description="more model versions by name (per-project fine-tunes); names are immutable",
    )
    promoted: str | None = Field(
        default=None, description="the version a request that names none gets; None = the base engine's"
    )
    cache_mb: float = Field(default=1024.0, gt=0, description="embedding cache budget per replica, MiB")
    max_batch_size: int = Field(default=4, ge=1, le=64, description="embeds batched together at most")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, le=1, description="how long a batch waits to fill"
    )
    embed_threads: int = Field(
        default=2, ge=1, le=32, description="parallel embeds of one batch (engines without embed_batch)"
    )


class AppArgs(SegmenterConfig):
    """``build_app`` arguments: the live configuration plus the deployments' sizing.

    Sizing given in a Serve config's ``deployments:`` section overrides these (Serve applies it
    after ``build_app``).
    """

    num_replicas: int | None = Field(
        default=None, ge=1, description="fixed replica count; None = autoscaling"
    )
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    num_cpus: float | None = Field(
        default=None, ge=0, description="per replica; None = SEEMLY_RAY_NUM_CPUS_PER_ACTOR"
    )
    num_gpus: float | None = Field(
        default=None, ge=0, description="per replica; None = SEEMLY_RAY_NUM_GPUS_PER_ACTOR"
    )
    max_ongoing_requests: int = Field(default=8, ge=1)
    ingress_num_cpus: float = Field(default=0.1, ge=0)
    ingress_replicas: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="the ingress's wait for one Segmenter call"
    )
    affinity: bool = Field(
        default=True,
        description="route an image's calls to one replica (False: Serve's default router, for comparison)",
    )

    def live(self) -> SegmenterConfig:
        return SegmenterConfig.model_validate(self.model_dump(include=set(SegmenterConfig.model_fields)))


# --- model versions ---------------------------------------------------------------------------------
def base_spec(config: SegmenterConfig) -> tuple[str, dict[str, Any]]:
    """(engine name, options) of the base engine: the config's, else the replica's SEEMLY_* settings."""
    settings = get_settings()
    name = config.engine or settings.engine
    options = config.engine_options
    if options is None:
        options = (
            {} if name == "classic" else {"checkpoint": settings.engine_checkpoint, "device": settings.device}
        )
    return name, dict(options)


class ModelRegistry:
    """Version name -> engine factory, for one live configuration."""

    def __init__(self, config: SegmenterConfig, previous: "ModelRegistry | None" = None) -> None:
        self.base_spec = base_spec(config)
        if previous is not None and previous.base_spec == self.base_spec:
            self.base = previous.base  # a live change of other settings: keep the loaded weights
        else:
            self.base = create_engine(self.base_spec[0], **self.base_spec[1])
        self.versions = dict(config.versions)
        self.promoted = config.promoted or self.base.model_version
        if self.promoted not in self.names():
            raise UnknownVersionError(
                f"promoted version {self.promoted!r} is neither the base engine "
                f"({self.base.model_version}) nor one of versions: {sorted(self.versions)}"
            )

    def names(self) -> list[str]:
        return [self.base.model_version, *sorted(self.versions)]

    def knows(self, version: str) -> bool:
        return version == self.base.model_version or version in self.versions

    def load(self, version: str) -> Engine:
        """The engine of ``version``: the base, one of the config's versions, else the database's
        model registry (a promoted fine-tune is served by name without a redeploy)."""
        if version == self.base.model_version:
            return self.base
        spec = self.versions.get(version)
        if spec is not None:
            return VersionedEngine(
                create_engine(spec.engine, **spec.options), version, spec.synthetic_embed_s
            )
        info = _registered(version)
        if info is None:
            raise UnknownVersionError(
                f"unknown model version {version!r}; this deployment serves {self.names()} "
                "and the model registry has no version of that name"
            )
        return load_version(info, device=get_settings().device)


_registry_db: Any = None
_registry_db_lock = threading.Lock()


def _registered(version: str) -> Any:
    """``versions.get_by_name`` on the replica's database (SEEMLY_DATABASE_URL), connected lazily.

    A registry that cannot be read makes the version unknown (404 with the reason), not a 5xx:
    the deployment's own versions keep being served whatever happens to the database.
    """
    global _registry_db
    from sqlalchemy.exc import SQLAlchemyError

    from seemly.db.session import make_engine, normalize_url
    from seemly.learning import versions

    with _registry_db_lock:
        if _registry_db is None:
            url = get_settings().database_url
            options: dict[str, Any] = {}
            if normalize_url(url).get_backend_name() == "postgresql":
                options = {"pool_size": 2, "max_overflow": 2, "connect_args": {"connect_timeout": 5}}
            _registry_db = make_engine(url, **options)
        db = _registry_db
    try:
        return versions.get_by_name(db, version)
    except SQLAlchemyError as exc:
        log.warning("cannot read the model registry for %r: %s", version, type(exc).__name__)
        raise UnknownVersionError(
            f"unknown model version {version!r}: it is not in this deployment's config and the model "
            f"registry cannot be read ({type(exc).__name__}; check SEEMLY_DATABASE_URL on the replicas)"
        ) from exc


# --- the Segmenter deployment ----------------------------------------------------------------------
@dataclass
class _EmbedJob:
    engine: Engine
    pixels: np.ndarray
    sha256: str


def _error(kind: str, message: str, field: str | None = None) -> dict[str, Any]:
    return SegmentAnswer(status="error", error=WireError(type=kind, message=message, field=field)).model_dump(
        mode="json"
    )


def _validation_error(exc: ValidationError) -> dict[str, Any]:
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    kind = "prompt" if path.startswith(("round", "memory")) else "bad_request"
    message = first["msg"].removeprefix("Value error, ")
    return _error(kind, f"{path}: {message}" if kind == "bad_request" and path else message, path or None)


def error_answer(exc: BaseException) -> dict[str, Any]:
    """The wire answer for an exception raised while serving a request."""
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, PromptError):
        return _error("prompt", exc.message, exc.field or None)
    if isinstance(exc, UnsupportedPromptError):
        return _error("unsupported_prompt", str(exc))
    if isinstance(exc, UnknownVersionError):
        return _error("unknown_version", str(exc))
    if isinstance(exc, EngineError):
        return _error("engine", str(exc))
    if isinstance(exc, MaskError | ValueError):
        return _error("bad_request", str(exc))
    log.exception("segmenter request failed", exc_info=exc)
    return _error("internal", f"{type(exc).__name__}: {exc}")


@serve.deployment(
    name=SEGMENTER,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=30,
    request_router_config=RequestRouterConfig(
        request_router_class="workers.serve_router:ImageAffinityRouter"
    ),
)
class Segmenter:
    """One replica: engines per model version, the embedding cache, batched embeds (module doc)."""

    def __init__(self) -> None:
        self.config = SegmenterConfig()
        self.registry: ModelRegistry | None = None
        self.cache = EmbedCache(int(self.config.cache_mb * 1024 * 1024))
        self._pool = ThreadPoolExecutor(max_workers=REPLICA_THREADS, thread_name_prefix="seemly-segment")
        self._embed_pool = ThreadPoolExecutor(
            max_workers=self.config.embed_threads, thread_name_prefix="seemly-embed"
        )
        self._stats_lock = threading.Lock()
        self.batches: list[int] = []  # sizes of the embed batches run (last 1000)
        self.requests = 0
        self.started = time.time()
        self.metrics = ReplicaMetrics()  # exported by Ray's metrics agent (workers/serve_metrics.py)
        install_request_ids()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        import ray

        self.actor_name = ray.get_runtime_context().get_actor_name()

    # --- configuration -------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply a live configuration (at start and on every change; no restart)."""
        config = SegmenterConfig.model_validate(user_config or {})
        # Validates (an unknown promoted version raises) before anything changes.
        registry = ModelRegistry(config, previous=self.registry)
        self.cache.resize(int(config.cache_mb * 1024 * 1024))
        self._embed_batch.set_max_batch_size(config.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if config.embed_threads != self.config.embed_threads:
            old, self._embed_pool = (
                self._embed_pool,
                ThreadPoolExecutor(max_workers=config.embed_threads, thread_name_prefix="seemly-embed"),
            )
            old.shutdown(wait=False)
        self.config, self.registry = config, registry
        log.info(
            "Segmenter %s: promoted %s, versions %s", self.replica_id, registry.promoted, registry.names()
        )

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def _model(self, version: str) -> Engine:
        assert self.registry is not None
        registry = self.registry
        return await asyncio.get_running_loop().run_in_executor(self._pool, registry.load, version)

    def _registry(self) -> ModelRegistry:
        if self.registry is None:  # deployed without a user_config: the defaults
            self.reconfigure({})
        assert self.registry is not None
        return self.registry

    async def _engine_for(self, requested: str | None) -> tuple[Engine, str]:
        self._registry()
        assert self.registry is not None
        # A name outside the live config is looked up in the database registry by ``load``
        # (UnknownVersionError there when it is unknown everywhere).
        version = serve.get_multiplexed_model_id() or requested or self.registry.promoted
        return await self._model(version), version

    # --- requests ----------------------------------------------------------------------------------------
    async def segment(
        self, request: dict[str, Any], *, sha256: str | None = None, pixels: np.ndarray | None = None
    ) -> dict[str, Any]:
        """One round (``request["round"]`` set) or whole-image proposals; answers a SegmentAnswer dict.

        Around :meth:`_segment`: the caller's request id (bound for the log lines, echoed in the
        answer) and the replica's metrics (latency by outcome, cache counters).
        """
        started = time.perf_counter()
        request_id = sane_request_id(request.get("request_id")) if isinstance(request, dict) else None
        with bind_request_id(request_id):
            answer = await self._segment(request, sha256=sha256, pixels=pixels)
            status = answer.get("status", "error")
            outcome = status if status != "error" else (answer.get("error") or {}).get("type", "internal")
            kind = "round" if isinstance(request, dict) and request.get("round") is not None else "everything"
            elapsed = time.perf_counter() - started
            self.metrics.observe(
                model_version=str(answer.get("model_version") or "unknown"),
                kind=kind,
                outcome=str(outcome),
                seconds=elapsed,
            )
            self.metrics.sync_cache(self.cache)
            log.debug("request %s: %s -> %s in %.1f ms", request_id or "-", kind, outcome, elapsed * 1000)
        if request_id:
            answer["request_id"] = request_id
        return answer

    async def _segment(
        self, request: dict[str, Any], *, sha256: str | None = None, pixels: np.ndarray | None = None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            req = SegmentRequest.model_validate(request)
            if sha256 is not None and sha256 != req.sha256:
                raise ValueError("the routing sha256 differs from the request's")
            pixels = self._pixels(req, pixels)
            engine, version = await self._engine_for(req.model_version)
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(
                self._pool, self._segment_sync, req, engine, version, pixels, loop, started
            )
        except Exception as exc:  # every failure becomes a typed answer, never a hang or a traceback
            return error_answer(exc)
        with self._stats_lock:
            self.requests += 1
        return answer

    async def prefetch(
        self, request: dict[str, Any], *, sha256: str | None = None, pixels: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Embed one image ahead: answers ``{"status": "cached" | "embedded" | "need_image"}``."""
        try:
            ref = ImageRef.model_validate({k: v for k, v in request.items() if k != "model_version"})
            pixels = self._pixels(ref, pixels)
            engine, version = await self._engine_for(request.get("model_version"))
            if self.cache.contains(ref.sha256, version):
                return {"status": "cached", "sha256": ref.sha256, "replica": self.replica_id}
            if pixels is None:
                return {"status": "need_image", "sha256": ref.sha256, "replica": self.replica_id}
            loop = asyncio.get_running_loop()

            def run() -> bool:
                embed = self._embedder(engine, ref.sha256, pixels, loop, {})
                with self.cache.use(ref.sha256, version, embed) as (_state, hit):
                    return hit

            hit = await loop.run_in_executor(self._pool, run)
            return {
                "status": "cached" if hit else "embedded",
                "sha256": ref.sha256,
                "replica": self.replica_id,
            }
        except Exception as exc:
            return error_answer(exc)

    async def info(self, *, sha256: str | None = None) -> dict[str, Any]:
        """This replica: identity, versions, cache and batching counters.

        ``sha256`` only steers the router: ``info(sha256=x)`` describes the replica that serves image x.
        """
        self._registry()
        assert self.registry is not None
        stats = self.cache.stats
        with self._stats_lock:
            batches = list(self.batches)
            requests = self.requests
        return {
            "replica": self.replica_id,
            "actor_name": self.actor_name,
            "started": self.started,
            "promoted": self.registry.promoted,
            "versions": self.registry.names(),
            "requests": requests,
            "cache": {
                "hits": stats.hits,
                "misses": stats.misses,
                "evictions": stats.evictions,
                "embed_seconds": round(stats.embed_seconds, 3),
                "entries": len(self.cache),
                "bytes": self.cache.cached_bytes,
                "budget_bytes": self.cache.cache_bytes,
            },
            "embed_batches": {
                "count": len(batches),
                "max_size": max(batches, default=0),
                "sizes": batches[-50:],
            },
        }

    # --- internals -----------------------------------------------------------------------------------------
    @staticmethod
    def _pixels(ref: ImageRef, pixels: np.ndarray | None) -> np.ndarray | None:
        if pixels is None and ref.image is not None:
            pixels = ref.image.to_array()
        if pixels is None:
            return None
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape != (ref.height, ref.width, 3):
            raise ValueError(
                f"pixels must be uint8 {ref.height}x{ref.width}x3, got {pixels.dtype} {tuple(pixels.shape)}"
            )
        return pixels

    def _embedder(
        self,
        engine: Engine,
        sha256: str,
        pixels: np.ndarray | None,
        loop: asyncio.AbstractEventLoop,
        timings: dict[str, float],
    ) -> Callable[[], ImageState]:
        """The embed callable for the cache: raise _NeedImage, or run the batched embed on the loop."""

        def embed() -> ImageState:
            if pixels is None:
                raise _NeedImage
            started = time.perf_counter()
            state = asyncio.run_coroutine_threadsafe(
                self._embed_batch(_EmbedJob(engine, pixels, sha256)), loop
            ).result()
            timings["embed_ms"] = (time.perf_counter() - started) * 1000.0
            if isinstance(state, BaseException):  # this image's embed failed (others in its batch may not)
                raise state
            return state

        return embed

    def _segment_sync(
        self,
        req: SegmentRequest,
        engine: Engine,
        version: str,
        pixels: np.ndarray | None,
        loop: asyncio.AbstractEventLoop,
        started: float,
    ) -> dict[str, Any]:
        if req.round is not None:
            req.round.check_bounds(req.width, req.height)
        memory = req.memory_results()  # decodes the masks: off the event loop
        timings: dict[str, float] = {}
        embed = self._embedder(engine, req.sha256, pixels, loop, timings)

        def run(state: ImageState) -> list[Segment]:
            began = time.perf_counter()
            try:
                if req.round is None:
                    try:
                        return engine.segment_everything(state)
                    except (NotImplementedError, ImportError) as exc:
                        raise EngineError(f"{engine.name} cannot segment a whole image: {exc}") from exc
                return engine.segment(state, req.round, memory)
            finally:
                timings["segment_ms"] = (time.perf_counter() - began) * 1000.0

        hit: bool | None = None
        try:
            if req.recompute:  # a stateless service: embed every time, cache untouched
                segments = run(embed())
            else:
                with self.cache.use(req.sha256, version, embed) as (state, hit):
                    segments = run(state)
        except _NeedImage:
            return SegmentAnswer(
                status="need_image", model_version=version, cache_hit=False, replica=self.replica_id
            ).model_dump(mode="json")
        encode_started = time.perf_counter()
        wire = [WireSegment.from_segment(s) for s in segments]
        timings["encode_ms"] = (time.perf_counter() - encode_started) * 1000.0
        timings["total_ms"] = (time.perf_counter() - started) * 1000.0
        timings["wait_ms"] = max(
            0.0,
            timings["total_ms"] - sum(timings.get(k, 0.0) for k in ("embed_ms", "segment_ms", "encode_ms")),
        )
        return SegmentAnswer(
            status="ok",
            segments=wire,
            model_version=version,
            cache_hit=hit,
            replica=self.replica_id,
            timings_ms=timings,
        ).model_dump(mode="json")

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, jobs: list[_EmbedJob]) -> list[ImageState]:
        """Embed concurrent first rounds together (an engine with ``embed_batch`` gets one call per version)."""
        with self._stats_lock:
            self.batches = [*self.batches[-999:], len(jobs)]
        loop = asyncio.get_running_loop()
        results: list[Any] = [None] * len(jobs)
        by_engine: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            by_engine.setdefault(id(job.engine), []).append(index)
        calls = []
        for indexes in by_engine.values():
            engine = jobs[indexes[0]].engine
            batched = getattr(engine, "embed_batch", None)
            if callable(batched):  # a future batched engine: one call for the whole group
                calls.append(self._run_batched(loop, batched, [jobs[i] for i in indexes], indexes, results))
            else:
                for i in indexes:
                    calls.append(self._run_one(loop, jobs[i], i, results))
        await asyncio.gather(*calls)
        return results

    async def _run_one(
        self, loop: asyncio.AbstractEventLoop, job: _EmbedJob, index: int, results: list[Any]
    ) -> None:
        try:
            results[index] = await loop.run_in_executor(
                self._embed_pool, job.engine.embed, job.pixels, job.sha256
            )
        except (
            Exception
        ) as exc:  # serve.batch hands each caller its own result: an exception fails that one only
            results[index] = exc

    async def _run_batched(
        self,
        loop: asyncio.AbstractEventLoop,
        batched: Callable[[list[np.ndarray], list[str]], list[ImageState]],
        jobs: list[_EmbedJob],
        indexes: list[int],
        results: list[Any],
    ) -> None:
        try:
            states = await loop.run_in_executor(
                self._embed_pool, batched, [j.pixels for j in jobs], [j.sha256 for j in jobs]
            )
            for i, state in zip(indexes, states, strict=True):
                results[i] = state
        except Exception as exc:
            for i in indexes:
                results[i] = exc


# --- the HTTP ingress ---------------------------------------------------------------------------------
_api = FastAPI(title="seemly segmenter", docs_url=None, redoc_url=None, openapi_url=None)


def _retryable(exc: BaseException) -> bool:
    """A replica died or is unreachable (try another); application errors are answers, not these."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError)


@serve.deployment(name=INGRESS, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(_api)
class SegmenterIngress:
    """HTTP in, ``Segmenter`` calls out (see the module doc). Routes under ``/segment``:

    ``POST /v1/segment``     one round (SegmentRequest JSON); ``POST /v1/everything`` proposals;
    ``POST /v1/prefetch``    embed images ahead (PrefetchRequest); ``GET /v1/health`` status.
    """

    def __init__(self, segmenter: Any, request_timeout_s: float = 60.0) -> None:
        self.segmenter = segmenter
        self.timeout_s = request_timeout_s

    async def call(
        self,
        method: str,
        payload: dict[str, Any] | None,
        sha256: str | None,
        version: str | None,
        pixels: Any,
    ) -> dict[str, Any]:
        """One Segmenter call with a deadline, retried on another replica if the replica dies."""
        handle = self.segmenter.options(multiplexed_model_id=version) if version else self.segmenter
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _error("unavailable", f"no Segmenter replica answered within {self.timeout_s:g} s")
            if payload is None:
                response = getattr(handle, method).remote()
            else:
                response = getattr(handle, method).remote(payload, sha256=sha256, pixels=pixels)
            try:
                return await asyncio.wait_for(response, timeout=remaining)
            except TimeoutError:
                response.cancel()
                return _error("unavailable", f"no Segmenter replica answered within {self.timeout_s:g} s")
            except Exception as exc:
                if not _retryable(exc):
                    raise
                attempt += 1
                log.warning(
                    "Segmenter replica failed under a %s request (%s); retrying", method, type(exc).__name__
                )
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    @staticmethod
    def _respond(answer: dict[str, Any]) -> JSONResponse:
        status = 200
        if answer.get("status") == "error":
            status = ERROR_STATUS.get((answer.get("error") or {}).get("type", "internal"), 500)
        return JSONResponse(answer, status_code=status)

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        import json

        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        return body

    async def _segment_like(self, request: Request, everything: bool) -> JSONResponse:
        try:
            body = await self._body(request)
            pixels = None
            if body.get("image") is not None:
                pixels = WireImage.model_validate(body.pop("image")).to_array()
            if everything:
                body["round"] = None
            sha256 = body.get("sha256") if isinstance(body.get("sha256"), str) else None
            version = body.get("model_version") if isinstance(body.get("model_version"), str) else None
            answer = await self.call("segment", body, sha256, version, pixels)
        except Exception as exc:
            answer = error_answer(exc)
        return self._respond(answer)

    @_api.post("/v1/segment")
    async def http_segment(self, request: Request) -> JSONResponse:
        return await self._segment_like(request, everything=False)

    @_api.post("/v1/everything")
    async def http_everything(self, request: Request) -> JSONResponse:
        return await self._segment_like(request, everything=True)

    @_api.post("/v1/prefetch")
    async def http_prefetch(self, request: Request) -> JSONResponse:
        try:
            prefetch = PrefetchRequest.model_validate(await self._body(request))
        except Exception as exc:
            return self._respond(error_answer(exc))

        async def one(ref: ImageRef) -> dict[str, Any]:
            pixels = ref.image.to_array() if ref.image is not None else None
            payload = ref.model_dump(mode="json", exclude={"image"})
            payload["model_version"] = prefetch.model_version
            try:
                return await self.call("prefetch", payload, ref.sha256, prefetch.model_version, pixels)
            except Exception as exc:
                return error_answer(exc)

        results = await asyncio.gather(*(one(ref) for ref in prefetch.images))
        return JSONResponse({"status": "ok", "results": list(results)})

    @_api.get("/v1/health")
    async def http_health(self) -> JSONResponse:
        try:
            info = await self.call("info", None, None, None, None)
        except Exception as exc:
            return JSONResponse({"status": "DOWN", "error": f"{type(exc).__name__}: {exc}"}, status_code=503)
        if info.get("status") == "error":
            return JSONResponse({"status": "DOWN", "error": info["error"]["message"]}, status_code=503)
        return JSONResponse({"status": "UP", "model_version": info["promoted"], "versions": info["versions"]})


# --- the application ------------------------------------------------------------------------------
def segmenter_options(args: AppArgs) -> dict[str, Any]:
    """``Segmenter.options(...)`` for these arguments (sizing from args or settings)."""
    settings = get_settings()
    num_cpus = settings.ray_num_cpus_per_actor if args.num_cpus is None else args.num_cpus
    num_gpus = settings.ray_num_gpus_per_actor if args.num_gpus is None else args.num_gpus
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": args.max_ongoing_requests,
        "user_config": args.live().model_dump(mode="json"),
    }
    if not args.affinity:
        options["request_router_config"] = RequestRouterConfig()  # power of two choices, no affinity
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": args.min_replicas,
            "max_replicas": max(args.max_replicas, args.min_replicas, 1),
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    return options


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application (``import_path: workers.serve:build_app``); ``args`` are :class:`AppArgs`."""
    parsed = AppArgs.model_validate(args or {})
    # The engines load in the replicas (weights, GPU), not here; names are checked at promotion.
    segmenter = Segmenter.options(**segmenter_options(parsed)).bind()
    return SegmenterIngress.options(
        num_replicas=parsed.ingress_replicas, ray_actor_options={"num_cpus": parsed.ingress_num_cpus}
    ).bind(segmenter, parsed.request_timeout_s)
