"""Log lines every seemly process writes alike: text or JSON, each carrying the current request id.

Why here and not in ``backend/logs.py``: the Ray Serve replicas (``workers/``) log the request id the
backend forwarded to them, and ``workers`` may not import ``backend``. ``backend/logs.py`` keeps the
HTTP side (taking the id from ``X-Request-ID``) and the secret redaction, and builds on this module.

* The id lives in a :class:`contextvars.ContextVar` (:func:`bind_request_id`), so it follows a
  request through its thread or asyncio task and never leaks into another request.
* A log-record factory (:func:`install_request_ids`) stamps ``record.seemly_request_id`` on
  **every** record made in the process ("-" outside a request), whichever handler formats it
  (pytest's ``caplog`` included): a filter on one handler would miss the others. Not
  ``record.request_id``: a factory-set attribute makes ``logger.info(..., extra={"request_id": ...})``
  raise KeyError, and Ray Serve logs its access lines exactly so (the JSON output prefers that
  ``extra`` value when a record has one).
* :class:`RedactSecrets` (one process-wide :data:`REDACTOR`) masks every known secret and any
  ``Authorization`` value in a record before a handler formats it; the backend registers the tokens it
  learns (``backend/logs.py``), :func:`setup_logging` the settings' secrets.
* :func:`setup_logging` configures the root logger once per process: ``SEEMLY_LOG_FORMAT=text``
  (the default, for people) or ``json`` (one object per line, for log shippers).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("seemly_request_id", default=None)
NO_REQUEST = "-"
#: What a caller-supplied request id may look like (anything else is replaced, never logged).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
_SANE_ID = re.compile(REQUEST_ID_PATTERN)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(seemly_request_id)s]: %(message)s"
FORMATS = ("text", "json")

# The attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "seemly_request_id",
    "taskName",
}


_AUTH_VALUE = re.compile(r"(?i)\b(Token|Bearer|Basic)\s+[A-Za-z0-9+/=._\-]{8,}")
# AWS SigV4 ``Credential=<access key id>/<date>/...`` (botocore logs signed requests at DEBUG)
_AWS_CREDENTIAL = re.compile(r"(Credential=)[A-Za-z0-9+/=._\-]+?(/\d{8}/)")
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
        text = _AWS_CREDENTIAL.sub(lambda m: f"{m.group(1)}{MASK}{m.group(2)}", text)
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


def settings_secrets(settings: Any) -> Iterator[str]:
    """Every secret a :class:`seemly.config.Settings` holds: its ``SecretStr`` fields and the database
    URL's password (a plain string there, since the URL is one setting)."""
    from pydantic import SecretStr
    from sqlalchemy.engine import make_url

    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            yield value.get_secret_value()
    try:
        password = make_url(settings.database_url).password
    except Exception:  # not a URL: nothing to hide in it
        password = None
    if password:
        yield str(password)


def sane_request_id(value: object) -> str | None:
    """``value`` if it is a usable request id (1-128 chars of ``[A-Za-z0-9._:-]``), else ``None``."""
    if isinstance(value, str) and _SANE_ID.match(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return REQUEST_ID.get()


@contextmanager
def bind_request_id(request_id: str | None) -> Iterator[str | None]:
    """Make ``request_id`` the current one for the block (``None`` leaves the current one)."""
    if request_id is None:
        yield REQUEST_ID.get()
        return
    token = REQUEST_ID.set(request_id)
    try:
        yield request_id
    finally:
        REQUEST_ID.reset(token)


_factory_lock = threading.Lock()
_installed = False


def install_request_ids() -> None:
    """Stamp ``seemly_request_id`` on every log record of this process (idempotent)."""
    global _installed
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            record.seemly_request_id = REQUEST_ID.get() or NO_REQUEST
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, ``extra`` fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None)
            or getattr(record, "seemly_request_id", None)
            or NO_REQUEST,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r}: use one of {', '.join(FORMATS)}")


def setup_logging(
    level: int = logging.INFO, log_format: str = "text", secrets: SecretSource | None = None
) -> logging.Handler:
    """Root logger -> one stderr handler in ``log_format``, redacting ``secrets`` (and whatever else
    registers with :data:`REDACTOR`); replaces the handler an earlier call added."""
    install_request_ids()
    if secrets is not None:
        REDACTOR.add_source(secrets)
    formatter = make_formatter(log_format)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_seemly", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._seemly = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    handler.addFilter(REDACTOR)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
