"""The control plane's error answers, one shape for HTTP and the WebSocket form of a route.

- :class:`HTTPError` (authentication, routing, query parameters, edge limits): ``{"detail": ...}`` with its
  status and any extra headers.
- :class:`cloudmodal.exception.Error` raised by a handler: ``{"error": {"type", "message"}}`` with the status
  :func:`error_status` gives its class.
- Anything else: 400 where the database refused a value of the request, else 500 ``{"detail": "Internal
  Server Error"}`` (logged with its traceback).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from starlette.exceptions import HTTPException

from cloudmodal import exception as exc

log = logging.getLogger("cloudmodal.server")


class HTTPError(HTTPException):
    """An error answered as ``{"detail": ...}`` with its status, and any extra response ``headers``."""

    detail: Any  # a message, or FastAPI's list of problems for query parameters

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)

    @property
    def status(self) -> int:
        return self.status_code


_STATUS = {
    exc.InvalidError: 400,
    exc.NotFoundError: 404,
    exc.AlreadyExistsError: 409,
    exc.PermissionDeniedError: 403,
    exc.AuthError: 401,
    exc.RequestSizeError: 413,
    exc.NoProviderError: 422,
    exc.ResourceExhaustedError: 429,
}


def error_status(e: exc.Error) -> int:
    for cls in type(e).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_answer(e: Exception, method: str | None, path: str | None) -> tuple[int, dict[str, Any]]:
    """The status and body answering ``e``, raised while serving ``method path``."""
    if isinstance(e, HTTPError):
        return e.status_code, {"detail": e.detail}
    if isinstance(e, exc.Error):
        return error_status(e), {"error": {"type": type(e).__name__, "message": str(e)}}
    dberr = sys.modules.get("sqlalchemy.exc")
    if dberr is not None and isinstance(e, dberr.DataError):
        # validation should have caught it: a warning, not a bug's traceback
        log.warning("%s %s: the database refused a value: %s", method, path, e.orig)
        message = "A value in the request does not fit the database (out of range or not storable)."
        return 400, {"error": {"type": "InvalidError", "message": message}}
    log.error("%s %s failed", method, path, exc_info=e)
    return 500, {"detail": "Internal Server Error"}
