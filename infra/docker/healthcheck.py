#!/usr/bin/env python3
"""Container health check: GET one URL on this container, exit 0 on HTTP 2xx, 1 otherwise.

Installed as ``seemly-healthcheck`` in the image; used by the Dockerfile's HEALTHCHECK, by the
compose healthchecks and by the Kubernetes probes of the backend (an ``exec`` probe, because the
backend's basic auth guards ``/health`` too and an ``httpGet`` probe cannot read a Secret).

    seemly-healthcheck                       # http://127.0.0.1:9090/health (the backend)
    seemly-healthcheck http://127.0.0.1:8265/api/gcs_healthz    # a Ray head

The URL may also come from ``SEEMLY_HEALTHCHECK_URL``. When ``SEEMLY_BACKEND_BASIC_AUTH_USER`` and
``..._PASSWORD`` are set, the credentials are sent, but only to a loopback address, and they are
never printed. Standard library only: it runs every few seconds and must start fast.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:9090/health"
TIMEOUT_S = 4.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A health endpoint answers directly; a redirect (which would carry the credentials) is a failure."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("SEEMLY_HEALTHCHECK_URL") or DEFAULT_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        print(f"unhealthy: not an http(s) URL: {parts.scheme}://{parts.hostname}", file=sys.stderr)
        return 1
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    user = os.environ.get("SEEMLY_BACKEND_BASIC_AUTH_USER", "")
    password = os.environ.get("SEEMLY_BACKEND_BASIC_AUTH_PASSWORD", "")
    if user and password and _is_loopback(parts.hostname):
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {shown}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if 200 <= status < 300:
        return 0
    print(f"unhealthy: {shown}: HTTP {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
