"""``GET /health/deep``: is every dependency of the backend usable right now?

Label Studio's ``/health`` must answer from memory within a second, so it checks nothing. This one
is for operators and orchestrators (a readiness probe, a dashboard): it checks

* ``database``: ``SELECT 1``;
* ``segmenter``: the in-process engine is loaded, or the Serve segmenter answers its health call;
* ``file_root:<path>``: each ``SEEMLY_FILE_ROOTS`` directory exists and can be listed;
* ``s3:<bucket/prefix>``: each ``SEEMLY_HEALTH_S3_URIS`` location can be listed (one key).

Each check runs in its own thread with a deadline (``SEEMLY_HEALTH_TIMEOUT_S``), all in parallel, so
one hung dependency costs one deadline, not the sum. The answer names each component with its status
and latency, never a URL with credentials, a key or a token (messages are the exception *type* and a
fixed description, or a storage message already scrubbed by :func:`seemly.storage.display_uri`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from seemly.config import Settings
from seemly.storage import Storage, StorageError, display_uri

Check = Callable[[], str | None]
"""Raises when the component is not usable; returns an optional detail otherwise."""


class _Unusable(StorageError):
    """A component answered but is not usable; the message is safe to show (see _describe_failure)."""


@dataclass(frozen=True)
class ComponentResult:
    status: str  # ok | fail
    latency_ms: float
    detail: str | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "latency_ms": round(self.latency_ms, 1)}
        if self.detail:
            out["detail" if self.status == "ok" else "error"] = self.detail
        return out


def _describe_failure(exc: BaseException) -> str:
    """A message that cannot carry a secret: storage errors are pre-scrubbed, the rest is the type."""
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    return f"{type(exc).__name__}" + (f" ({type(orig).__name__})" if orig is not None else "")


def run_checks(checks: dict[str, Check], timeout_s: float) -> dict[str, ComponentResult]:
    """Run every check in parallel; one that does not finish within ``timeout_s`` fails as timed out."""
    futures: dict[str, tuple[Future[str | None], float]] = {}
    for name, check in checks.items():
        future: Future[str | None] = Future()

        def target(check: Check = check, future: Future[str | None] = future) -> None:
            try:
                future.set_result(check())
            except BaseException as exc:
                future.set_exception(exc)

        started = time.perf_counter()
        threading.Thread(target=target, name=f"seemly-health-{name[:20]}", daemon=True).start()
        futures[name] = (future, started)
    deadline = time.perf_counter() + timeout_s
    results: dict[str, ComponentResult] = {}
    for name, (future, started) in futures.items():
        try:
            detail = future.result(timeout=max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            results[name] = ComponentResult("fail", (time.perf_counter() - started) * 1000, "timed out")
            continue
        except Exception as exc:
            results[name] = ComponentResult(
                "fail", (time.perf_counter() - started) * 1000, _describe_failure(exc)
            )
            continue
        results[name] = ComponentResult("ok", (time.perf_counter() - started) * 1000, detail)
    return results


# --- the checks --------------------------------------------------------------------------------------
def database_check(db: Engine, timeout_s: float) -> Check:
    def check() -> str | None:
        with db.connect() as conn:
            if db.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))
            conn.execute(text("SELECT 1")).scalar_one()
        return None

    return check


def segmenter_check(segmenter: Any) -> Check:
    def check() -> str | None:
        engine = getattr(segmenter, "engine", None)
        if engine is not None:  # in process: loaded when the client was built
            return f"in process: {engine.name} ({segmenter.model_version})"
        probe = getattr(segmenter, "probe", None)
        if probe is None:
            return f"{type(segmenter).__name__} ({segmenter.model_version})"
        problem = probe()
        if problem is not None:
            # The client's message names the service's URL (no credentials: http(s) URLs with
            # userinfo are refused at start-up) and how to start it.
            raise _Unusable(problem)
        return f"serve: {segmenter.model_version}"

    return check


def file_root_check(root: Path) -> Check:
    def check() -> str | None:
        if not root.is_dir():
            raise _Unusable(f"{root}: not a directory (SEEMLY_FILE_ROOTS)")
        if not os.access(root, os.R_OK | os.X_OK):
            raise _Unusable(f"{root}: not readable by this process")
        with os.scandir(root) as entries:
            next(entries, None)
        return None

    return check


def s3_check(storage: Storage, uri: str) -> Check:
    def check() -> str | None:
        first = next(iter(storage.iter_objects(uri)), None)
        return "empty" if first is None else None

    return check


def deep_health(
    settings: Settings, db: Engine, segmenter: Any, *, probe_storage: Storage | None = None
) -> tuple[dict[str, Any], int]:
    """The ``/health/deep`` answer and its status: 200 if every component is ok, else 503."""
    timeout = settings.health_timeout_s
    checks: dict[str, Check] = {
        "database": database_check(db, timeout),
        "segmenter": segmenter_check(segmenter),
    }
    for root in settings.file_roots:
        checks[f"file_root:{root}"] = file_root_check(Path(root))
    if settings.health_s3_uris:
        # One page of one key, one attempt, the deadline as socket timeouts: a cheap probe.
        storage = probe_storage or Storage.from_settings(
            settings, s3_page_size=1, s3_max_attempts=1, s3_timeout=(timeout, timeout)
        )
        for uri in settings.health_s3_uris:
            checks[f"s3:{display_uri(uri).removeprefix('s3://')}"] = s3_check(storage, uri)
    started = time.perf_counter()
    results = run_checks(checks, timeout)
    ok = all(r.status == "ok" for r in results.values())
    body = {
        "status": "ok" if ok else "fail",
        "failed": sorted(name for name, r in results.items() if r.status != "ok"),
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        "components": {name: r.body() for name, r in results.items()},
    }
    return body, 200 if ok else 503
