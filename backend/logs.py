"""Logging without secrets.

The first defence is that nothing logs request bodies or headers (see :mod:`backend.compat`). This
filter is the second: any log record whose text contains a known secret (Label Studio tokens learnt
from ``/setup``, ``SEEMLY_LABEL_STUDIO_API_KEY``, the basic-auth password, S3 keys) is rewritten
with the secret masked before a handler formats it, and ``Authorization: Token/Basic ...`` values
are masked wherever they appear.

One filter object serves the whole process (handlers are process-wide); every app registers where
its secrets come from with :func:`install`.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Callable, Iterable

_AUTH_VALUE = re.compile(r"(?i)\b(Token|Bearer|Basic)\s+[A-Za-z0-9+/=._\-]{8,}")
MASK = "***"

SecretSource = Callable[[], Iterable[str]]


class RedactSecrets(logging.Filter):
    """Masks the secrets its sources return (asked per record: the sets grow at runtime)."""

    def __init__(self) -> None:
        super().__init__("")
        self._lock = threading.Lock()
        self._sources: list[Callable[[], SecretSource | None]] = []

    def add_source(self, source: SecretSource) -> None:
        ref: Callable[[], SecretSource | None]
        try:
            ref = weakref.WeakMethod(source)  # type: ignore[arg-type]
        except TypeError:
            ref = lambda: source  # noqa: E731 - a plain function lives as long as its module
        with self._lock:
            self._sources.append(ref)

    def secrets(self) -> list[str]:
        out: list[str] = []
        with self._lock:
            sources = list(self._sources)
        for ref in sources:
            source = ref()
            if source is not None:
                out += [s for s in source() if s and len(s) >= 4]
        return out

    def redact(self, text: str) -> str:
        text = _AUTH_VALUE.sub(lambda m: f"{m.group(1)} {MASK}", text)
        for secret in self.secrets():
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to complain
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


REDACTOR = RedactSecrets()


def install(source: SecretSource, logger: logging.Logger | None = None) -> RedactSecrets:
    """Register ``source`` and attach the process's redacting filter to ``logger``'s handlers (root)."""
    REDACTOR.add_source(source)
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)
    return REDACTOR
