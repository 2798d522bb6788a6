"""The backend's client of the Ray Serve segmenter (``workers/serve.py``): a :class:`SegmenterClient`.

Two transports, one protocol (:mod:`seemly.serving`):

* **HTTP** (``SEEMLY_SEGMENTER_URL=http://127.0.0.1:8000/segment``): JSON to the Serve proxy, for a
  backend outside the Ray cluster (the usual case: gunicorn next to Label Studio);
* **DeploymentHandle** (``SEEMLY_SEGMENTER_URL=serve://segmenter``): for a process that is itself on
  the Ray cluster (``SEEMLY_RAY_ADDRESS``); no proxy hop, pixels go through Ray's object store.

Images are sent by identity (sha256 + size). The pixels travel only on a miss: the first time this
client meets an image it sends them with the request (the backend has just decoded it to learn its
sha256, so they are at hand); afterwards it sends none, and if the serving replica has lost the
embedding (evicted, replaced, or the image moved to another replica) it answers ``need_image`` and
the request is repeated once with the pixels (``ImageHandle.load``). Why the service never fetches
URIs itself: docs/serve.md.

Every call has a deadline (``SEEMLY_SEGMENTER_TIMEOUT_S``). A service that is down is a
:class:`SegmenterUnavailableError` (an ``EngineError``: the backend answers 503) whose message says
how to start it; a replica that dies under a request is retried on another one, by the ingress for
HTTP and here for the handle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests

from backend.segmenter import ImageChangedError, ImageHandle
from seemly.engines.base import EngineError, Segment, UnsupportedPromptError
from seemly.learning.versions import VersionInfo
from seemly.log_setup import current_request_id
from seemly.prompts import PromptError, PromptRound, RoundResult
from seemly.serving import SegmentAnswer, WireImage, encode_memory

log = logging.getLogger(__name__)

START_HINT = "start it with `seemly serve`"
APP_NAME = "segmenter"
DEPLOYMENT = "Segmenter"
VERSION_TTL_S = 10.0


def _request_id_header() -> dict[str, str] | None:
    request_id = current_request_id()
    return {"X-Request-ID": request_id} if request_id else None


class SegmenterUnavailableError(EngineError):
    """The segmenter service cannot be reached (down, not deployed, or too slow)."""


class _HttpTransport:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._local = threading.local()

    @property
    def where(self) -> str:
        return self.url

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _unavailable(self, why: str) -> SegmenterUnavailableError:
        return SegmenterUnavailableError(
            f"the segmenter service at {self.url} is not reachable ({why}); {START_HINT}"
        )

    def call(
        self,
        method: str,
        payload: dict[str, Any],
        pixels: np.ndarray | None,
        version: str | None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        body = dict(payload)
        if pixels is not None:
            body["image"] = WireImage.from_array(pixels).model_dump()
        if version and "model_version" not in body:
            body["model_version"] = version
        if method == "prefetch":  # the HTTP route takes a list of images
            body = {"images": [body], "model_version": body.pop("model_version", None)}
        path = {"segment": "/v1/segment", "everything": "/v1/everything", "prefetch": "/v1/prefetch"}[method]
        return self._request("POST", path, body, timeout_s)

    def info(self, timeout_s: float) -> dict[str, Any]:
        answer = self._request("GET", "/v1/health", None, timeout_s, attempts=1)  # fast, even when down
        if answer.get("status") != "UP":
            raise self._unavailable(f"it is not ready: {answer.get('error', answer.get('status'))}")
        return answer

    def _request(
        self, verb: str, path: str, body: dict[str, Any] | None, timeout_s: float | None, attempts: int = 3
    ) -> dict[str, Any]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for attempt in range(attempts):
            try:
                response = self._session().request(
                    verb,
                    self.url + path,
                    json=body,
                    timeout=(min(2.0, timeout), timeout),
                    headers=_request_id_header(),  # Serve's proxy adopts it as its request id
                )
            except requests.ConnectionError as exc:
                if attempt + 1 < attempts and "refused" not in str(exc).lower():
                    time.sleep(0.1 * 2**attempt)  # a dropped keep-alive connection: once more
                    continue
                raise self._unavailable("connection failed") from exc
            except requests.Timeout as exc:
                raise SegmenterUnavailableError(
                    f"the segmenter service at {self.url} did not answer within {timeout:g} s"
                ) from exc
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if isinstance(answer, dict) and ("status" in answer):
                return answer  # our own answers, errors included (typed by the caller)
            if response.status_code == 404:
                raise self._unavailable("no segmenter application is deployed there")
            if response.status_code in (502, 503, 504) and attempt + 1 < attempts:
                time.sleep(0.2 * 2**attempt)  # the proxy has no replica yet (starting, replacing one)
                continue
            raise self._unavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        raise self._unavailable("no answer")  # pragma: no cover - the loop always returns or raises


class _HandleTransport:
    """Calls the Segmenter deployment through a DeploymentHandle (this process is on the Ray cluster)."""

    def __init__(self, app_name: str, timeout_s: float, ray_address: str | None) -> None:
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.ray_address = ray_address
        self._handle: Any = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"serve://{self.app_name} (Ray {self.ray_address or 'local'})"

    def _get(self) -> Any:
        with self._lock:
            if self._handle is None:
                import ray
                from ray import serve

                if not ray.is_initialized():
                    ray.init(address=self.ray_address or "auto", log_to_driver=False)
                try:
                    self._handle = serve.get_deployment_handle(DEPLOYMENT, app_name=self.app_name)
                except Exception as exc:
                    raise SegmenterUnavailableError(
                        f"the segmenter service {self.where} is not reachable "
                        f"({type(exc).__name__}: {exc}); {START_HINT}"
                    ) from exc
            return self._handle

    def call(
        self,
        method: str,
        payload: dict[str, Any],
        pixels: np.ndarray | None,
        version: str | None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        name = "prefetch" if method == "prefetch" else "segment"
        return self._call(
            name, (payload,), {"sha256": payload.get("sha256"), "pixels": pixels}, version, timeout_s
        )

    def info(self, timeout_s: float) -> dict[str, Any]:
        info = self._call("info", (), {}, None, timeout_s)
        return {"status": "UP", "model_version": info["promoted"], "versions": info["versions"]}

    def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        version: str | None,
        timeout_s: float | None,
    ) -> dict[str, Any]:
        from ray.exceptions import GetTimeoutError, RayActorError

        handle = self._get()
        if version:
            handle = handle.options(multiplexed_model_id=version)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            response = getattr(handle, method).remote(*args, **kwargs)
            try:
                return response.result(timeout_s=remaining)
            except (TimeoutError, GetTimeoutError):
                response.cancel()
                break
            except RayActorError as exc:  # the replica died under the request: another one takes it
                attempt += 1
                log.warning("Segmenter replica failed (%s); retrying", type(exc).__name__)
                time.sleep(min(0.05 * 2**attempt, 1.0))
        raise SegmenterUnavailableError(
            f"the segmenter service {self.where} did not answer within {timeout:g} s"
        )


class _Shared:
    """State shared by a client and its per-version views: transport, images sent, prefetch pool."""

    def __init__(self, transport: _HttpTransport | _HandleTransport, remember: int = 4096) -> None:
        self.transport = transport
        self.remember = remember
        self.lock = threading.Lock()
        self.sent: OrderedDict[str, None] = OrderedDict()  # sha256 of images already sent to the service
        self.version: tuple[str, float] | None = None  # (promoted version, when learnt)
        self.prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seemly-prefetch")
        self.local = threading.local()  # this thread's last answer (diagnostics, benchmarks)

    def was_sent(self, sha256: str) -> bool:
        with self.lock:
            if sha256 in self.sent:
                self.sent.move_to_end(sha256)
                return True
            return False

    def mark_sent(self, sha256: str) -> None:
        with self.lock:
            self.sent[sha256] = None
            self.sent.move_to_end(sha256)
            while len(self.sent) > self.remember:
                self.sent.popitem(last=False)


class ServeSegmenter:
    """A :class:`backend.segmenter.SegmenterClient` backed by the Ray Serve segmenter (module doc)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        model_version: str | None = None,
        ray_address: str | None = None,
        recompute: bool = False,
        _shared: _Shared | None = None,
    ) -> None:
        self.url = url
        self.pinned_version = model_version
        self.recompute = recompute  # benchmarks: a stateless service (embed on every request)
        if _shared is None:
            parsed = urlparse(url)
            if parsed.scheme in ("http", "https"):
                transport: _HttpTransport | _HandleTransport = _HttpTransport(url, timeout_s)
            elif parsed.scheme == "serve":
                transport = _HandleTransport(parsed.netloc or APP_NAME, timeout_s, ray_address)
            else:
                raise ValueError(f"segmenter URL {url!r}: use http://host:port/segment or serve://<app name>")
            _shared = _Shared(transport)
        self._shared = _shared

    @property
    def transport(self) -> _HttpTransport | _HandleTransport:
        return self._shared.transport

    def for_version(self, model_version: str | VersionInfo | None) -> ServeSegmenter:
        """A view of this client that asks for ``model_version`` (a project's promoted fine-tune,
        by name or registry entry; the service loads a registered name it was not configured with).
        None: the service's promoted version."""
        if isinstance(model_version, VersionInfo):
            model_version = model_version.name
        if model_version == self.pinned_version:
            return self
        return ServeSegmenter(
            self.url, model_version=model_version, recompute=self.recompute, _shared=self._shared
        )

    # --- SegmenterClient --------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """The pinned version, else the service's promoted one (refreshed every few seconds)."""
        if self.pinned_version:
            return self.pinned_version
        shared = self._shared
        known = shared.version
        if known is not None and time.monotonic() - known[1] < VERSION_TTL_S:
            return known[0]
        try:
            version = str(self.transport.info(timeout_s=0.5)["model_version"])
        except Exception as exc:  # /health must answer fast even when the service is down
            log.debug("cannot refresh the segmenter's model version: %s", exc)
            return known[0] if known is not None else "segmenter-unavailable"
        shared.version = (version, time.monotonic())
        return version

    def segment(
        self, image: ImageHandle, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        payload = self._payload(image)
        payload["round"] = prompt_round.model_dump(mode="json", by_alias=True)
        payload["memory"] = encode_memory(list(memory))
        return self._segments(self._call_with_image("segment", image, payload))

    def segment_everything(self, image: ImageHandle) -> list[Segment]:
        return self._segments(self._call_with_image("everything", image, self._payload(image)))

    # --- more ----------------------------------------------------------------------------------------
    def probe(self) -> str | None:
        """``None`` when the service answers its health check, else why not (with how to start it)."""
        try:
            self.transport.info(timeout_s=3.0)
        except SegmenterUnavailableError as exc:
            return str(exc)
        except Exception as exc:
            return f"the segmenter service at {self.transport.where} is not usable ({exc}); {START_HINT}"
        return None

    def prefetch(self, images: Sequence[ImageHandle], wait: bool = False) -> list[Future[str]]:
        """Embed ``images`` ahead, in the background (the next tasks of an annotator's queue).

        Each future gives ``"cached"``, ``"embedded"`` or an exception; ``wait=True`` waits for all.
        Pixels are loaded and sent only for images the service does not hold yet.
        """
        futures = [self._shared.prefetcher.submit(self._prefetch_one, image) for image in images]
        if wait:
            for future in futures:
                future.exception()
        return futures

    def close(self) -> None:
        self._shared.prefetcher.shutdown(wait=False, cancel_futures=True)

    # --- internals -----------------------------------------------------------------------------------
    def _payload(self, image: ImageHandle) -> dict[str, Any]:
        payload: dict[str, Any] = {"sha256": image.sha256, "width": image.width, "height": image.height}
        if self.pinned_version:
            payload["model_version"] = self.pinned_version
        if self.recompute:
            payload["recompute"] = True
        request_id = current_request_id()
        if request_id:  # the replica logs and echoes it (seemly.log_setup)
            payload["request_id"] = request_id
        return payload

    def _pixels(self, image: ImageHandle) -> np.ndarray:
        decoded = image.load()
        if decoded.sha256 != image.sha256:
            raise ImageChangedError(f"{image.uri}: content changed (sha256 {decoded.sha256[:12]}…)")
        return np.asarray(decoded.array)

    def _call_with_image(self, method: str, image: ImageHandle, payload: dict[str, Any]) -> dict[str, Any]:
        shared = self._shared
        eager = self.recompute or not shared.was_sent(image.sha256)
        pixels = self._pixels(image) if eager else None
        answer = self.transport.call(method, payload, pixels, self.pinned_version)
        if answer.get("status") == "need_image" and pixels is None:
            pixels = self._pixels(image)
            answer = self.transport.call(method, payload, pixels, self.pinned_version)
        if pixels is not None and answer.get("status") == "ok":
            shared.mark_sent(image.sha256)
        shared.local.pixels_sent = pixels is not None
        return answer

    def _prefetch_one(self, image: ImageHandle) -> str:
        payload = self._payload(image)
        payload.pop("recompute", None)
        answer = self._unwrap_prefetch(self.transport.call("prefetch", payload, None, self.pinned_version))
        if answer == "need_image":
            pixels = self._pixels(image)
            answer = self._unwrap_prefetch(
                self.transport.call("prefetch", payload, pixels, self.pinned_version)
            )
        self._shared.mark_sent(image.sha256)
        return answer

    def _unwrap_prefetch(self, answer: dict[str, Any]) -> str:
        if "results" in answer:  # HTTP: one result per image
            answer = answer["results"][0]
        if answer.get("status") == "error":
            self._raise(answer)
        return str(answer["status"])

    @property
    def last_answer(self) -> dict[str, Any]:
        """This thread's last answer without its masks: ``timings_ms`` (inside the replica),
        ``cache_hit``, ``replica``, ``model_version``, ``pixels_sent``, ``request_id``."""
        return dict(getattr(self._shared.local, "last", {}))

    def _segments(self, answer: dict[str, Any]) -> list[Segment]:
        parsed = SegmentAnswer.model_validate(answer)
        self._shared.local.last = {
            "timings_ms": parsed.timings_ms,
            "cache_hit": parsed.cache_hit,
            "replica": parsed.replica,
            "model_version": parsed.model_version,
            "pixels_sent": getattr(self._shared.local, "pixels_sent", None),
            "request_id": parsed.request_id,  # echoed by the replica: the id reached it
        }
        if parsed.status == "ok":
            return [wire.to_segment() for wire in parsed.segments]
        if parsed.status == "need_image":  # only if the pixels we just sent were lost: a service bug
            raise EngineError("the segmenter service asked twice for the same image")
        self._raise(answer)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise(self, answer: dict[str, Any]) -> None:
        error = answer.get("error") or {}
        kind, message = error.get("type", "internal"), error.get("message", "unknown error")
        if kind == "prompt":
            raise PromptError(error.get("field") or "", message)
        if kind == "unsupported_prompt":
            raise UnsupportedPromptError(message)
        if kind == "unavailable":
            raise SegmenterUnavailableError(f"the segmenter service at {self.transport.where}: {message}")
        if kind == "internal":
            raise EngineError(f"the segmenter service failed: {message}")
        raise EngineError(message)
