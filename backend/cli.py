"""``seemly backend``: serve the Label Studio ML backend.

Production serving is gunicorn, driven from Python (:class:`GunicornApp`, a
``gunicorn.app.base.BaseApplication``): **one worker process with threads** (``gthread``) by
default, because

* the embedding cache and the annotators' sessions live in process memory: with N workers each
  image would be embedded (and held) N times, and an annotator's consecutive clicks could land on
  different workers, each with a different, partial session;
* the heavy work (numpy, OpenCV, max-flow) releases the GIL, and requests on different images run
  in parallel threads; requests on the same image are serialised anyway (one engine state);
* scaling out is the Ray Serve deployment's job (a later issue), behind the same segmenter protocol.

``--workers N`` still works (``/setup`` state is in Postgres, so every worker can fetch images), but
interactive sessions are per worker; put a sticky load balancer in front if you do that.
``--dev`` runs werkzeug's threaded development server instead (no gunicorn).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask

from backend.app import BackendOptions, backend_of, create_app
from seemly.config import get_settings

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9090, help="port to listen on (default: 9090)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (default 1: see the module doc)"
    )
    parser.add_argument("--threads", type=int, default=8, help="request threads per worker (default: 8)")
    parser.add_argument(
        "--timeout", type=int, default=300, help="seconds before a silent worker is restarted"
    )
    parser.add_argument(
        "--dev", action="store_true", help="werkzeug's development server instead of gunicorn"
    )
    parser.add_argument(
        "--embed-cache-mb", type=int, default=1024, help="memory budget of the embedding cache"
    )
    parser.add_argument("--max-sessions", type=int, default=2000, help="interactive sessions kept (LRU)")
    parser.add_argument(
        "--session-idle-s", type=float, default=3600.0, help="an idle interactive session ends after this"
    )


def options_from(args: argparse.Namespace) -> BackendOptions:
    return BackendOptions(
        embed_cache_mb=args.embed_cache_mb,
        max_sessions=args.max_sessions,
        session_idle_seconds=args.session_idle_s,
    )


def gunicorn_config(args: argparse.Namespace) -> dict[str, Any]:
    """The gunicorn settings ``seemly backend`` runs with."""
    if args.workers < 1 or args.threads < 1:
        raise SystemExit("--workers and --threads must be at least 1")
    return {
        "bind": f"{args.host}:{args.port}",
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "timeout": args.timeout,
        "graceful_timeout": 30,
        "keepalive": 5,
        "preload_app": False,  # build the app (threads, DB pool) in the worker, after the fork
        "accesslog": None,  # request lines are logged by the app at DEBUG, without bodies or headers
        "errorlog": "-",
        "loglevel": "debug" if getattr(args, "verbose", False) else "info",
        "worker_exit": _worker_exit,
        "proc_name": "seemly-backend",
        "control_socket_disable": True,  # one fixed socket path per user would clash between backends
    }


def _worker_exit(server: Any, worker: Any) -> None:
    """Write the queued history before a worker goes away (restart, SIGTERM)."""
    app = getattr(worker, "wsgi", None)
    if isinstance(app, Flask) and "seemly" in app.extensions:
        backend_of(app).close()


class GunicornApp:
    """``gunicorn.app.base.BaseApplication`` serving :func:`backend.app.create_app` (built per worker)."""

    def __new__(cls, factory: Callable[[], Flask], config: dict[str, Any]) -> Any:
        from gunicorn.app.base import BaseApplication

        class _App(BaseApplication):  # type: ignore[misc]
            def load_config(self) -> None:
                for key, value in config.items():
                    if key in self.cfg.settings and value is not None:
                        self.cfg.set(key.lower(), value)
                if config.get("accesslog") is None:
                    self.cfg.set("accesslog", None)

            def load(self) -> Flask:
                return factory()

        return _App()


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    settings = get_settings()
    options = options_from(args)
    if args.workers > 1:
        log.warning(
            "%d workers: each keeps its own embedding cache and interactive sessions; "
            "an annotator's clicks must reach the same worker (sticky sessions)",
            args.workers,
        )
    if args.dev:
        from werkzeug.serving import run_simple

        app = create_app(settings, options=options)
        log.info("seemly backend (development server) on http://%s:%d", args.host, args.port)
        try:
            run_simple(args.host, args.port, app, threaded=True, use_reloader=False)
        finally:
            backend_of(app).close()
        return 0
    log.info(
        "seemly backend on http://%s:%d (%d worker(s) x %d threads)",
        args.host,
        args.port,
        args.workers,
        args.threads,
    )
    GunicornApp(lambda: create_app(settings, options=options), gunicorn_config(args)).run()
    return 0
