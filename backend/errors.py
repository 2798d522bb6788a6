"""Every way a request can fail, as an HTTP status and a message that says what is wrong.

Domain errors from the kernel keep their precise messages; this module only decides the status.
A client mistake is a 4xx with ``{"error": "..."}``; a failure of something the backend depends on
(Label Studio unreachable, database down) is a 502/503; only a bug is a 500, and its details stay
in the log, never in the answer.
"""

from __future__ import annotations

from plugin.labeling_config import LabelingConfigError
from seemly.engines.base import EngineError, UnsupportedPromptError
from seemly.images import ImageError
from seemly.masks import MaskError
from seemly.prompts import PromptError
from seemly.storage import (
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageAccessError,
    StorageError,
    UnsupportedURIError,
)


class ApiError(Exception):
    """An answer other than 200: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, str]:
        out = {"error": self.message}
        if self.field:
            out["field"] = self.field
        return out


def from_exception(exc: BaseException) -> ApiError | None:
    """The answer for a known domain error, or ``None`` for an unexpected one (a bug: 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptError):
        where = f"{exc.field}: " if exc.field else ""
        return ApiError(422, f"{where}{exc.message}", exc.field or None)
    if isinstance(exc, LabelingConfigError):
        return ApiError(422, f"unsupported labeling config: {exc}", "label_config")
    if isinstance(exc, UnsupportedPromptError):
        return ApiError(422, str(exc))
    if isinstance(exc, ImageError):
        return ApiError(422, f"cannot use the task's image: {exc}")
    if isinstance(exc, MaskError):
        return ApiError(422, f"invalid mask: {exc}")
    if isinstance(exc, UnsupportedURIError):
        return ApiError(422, f"cannot fetch the task's image: {exc}")
    if isinstance(exc, StorageAccessError):
        return ApiError(403, f"the backend may not fetch the task's image: {exc}")
    if isinstance(exc, ObjectNotFoundError):
        return ApiError(404, f"the task's image does not exist: {exc}")
    if isinstance(exc, ObjectTooLargeError):
        return ApiError(413, f"the task's image is too large: {exc}")
    if isinstance(exc, StorageError):
        return ApiError(502, f"cannot fetch the task's image: {exc}")
    if isinstance(exc, EngineError):
        return ApiError(503, f"the segmentation engine cannot serve this request: {exc}")
    return None
