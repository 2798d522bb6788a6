"""Logging without secrets.

The first defence is that nothing logs request bodies or headers (see :mod:`backend.compat`). The
filter (:class:`seemly.log_setup.RedactSecrets`, shared with the CLI jobs) is the second: any log record whose text contains a known secret (Label Studio tokens learnt
from ``/setup``, ``SEEMLY_LABEL_STUDIO_API_KEY``, the basic-auth password, S3 keys) is rewritten
with the secret masked before a handler formats it, and ``Authorization: Token/Basic ...`` values
are masked wherever they appear.

One filter object serves the whole process (handlers are process-wide); every app registers where
its secrets come from with :func:`install`.

Request ids: every request gets one (:func:`request_id_for`: the caller's ``X-Request-ID`` if it is
sane, else a new one), bound for the request's duration with
:func:`seemly.log_setup.bind_request_id`, so that every log record made while serving it carries
``request_id`` (text and JSON formats: :mod:`seemly.log_setup`). It is echoed in the response header
and forwarded to the Serve segmenter.
"""

from __future__ import annotations

import logging

from seemly.log_setup import (
    MASK,
    REDACTOR,
    RedactSecrets,
    SecretSource,
    install_request_ids,
    new_request_id,
    sane_request_id,
)

__all__ = [
    "MASK",
    "REDACTOR",
    "REQUEST_ID_HEADER",
    "RedactSecrets",
    "SecretSource",
    "install",
    "request_id_for",
]

REQUEST_ID_HEADER = "X-Request-ID"


def request_id_for(header_value: str | None) -> str:
    """The id of a request: the caller's ``X-Request-ID`` when it is sane, else a fresh one.

    A caller's id is kept only if it is 1-128 characters of ``[A-Za-z0-9._:-]``: anything else
    (log injection, a secret pasted by mistake, megabytes of junk) is replaced, never logged.
    """
    return sane_request_id(header_value) or new_request_id()


def install(source: SecretSource, logger: logging.Logger | None = None) -> RedactSecrets:
    """Register ``source`` and attach the process's redacting filter to ``logger``'s handlers (root);
    stamp request ids on every log record."""
    install_request_ids()
    REDACTOR.add_source(source)
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)
    return REDACTOR
