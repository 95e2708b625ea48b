"""One error body everywhere: `{"error": message, "error_type": kind}`, mapped from domain errors.

Statuses follow text-embeddings-inference's contract: empty input 400, invalid
input 422, missing 404, conflict 409, refused stored data 424, not ready 503; a
full disk is 507 (nothing was written), never a bare 500.
"""

from __future__ import annotations

import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.durable_files import STORAGE_FULL_HINT, is_storage_full
from training.errors import Conflict, EmptyInput, IntegrityError, InvalidInput, LockstepError, NotFound, NotReady

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[LockstepError], int, str]] = [
    (EmptyInput, 400, "empty"),
    (InvalidInput, 422, "validation"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (IntegrityError, 424, "integrity"),
    (NotReady, 503, "unhealthy"),
]


_HTTP_KINDS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large"}


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str
    error_type: str


ERROR_RESPONSES = {
    400: {"model": ErrorBody, "description": "Empty input"},
    404: {"model": ErrorBody, "description": "No such document or release"},
    413: {"model": ErrorBody, "description": "The request body is larger than LOCKSTEP_MAX_REQUEST_BYTES"},
    422: {"model": ErrorBody, "description": "Invalid input; the message says what to fix"},
    503: {"model": ErrorBody, "description": "No release loaded yet"},
    507: {"model": ErrorBody, "description": "The server's disk is full; nothing was written"},
}
ADMIN_ERROR_RESPONSES = ERROR_RESPONSES | {
    401: {"model": ErrorBody, "description": "No `Authorization: Bearer <token>` header"},
    403: {"model": ErrorBody, "description": "Wrong admin token, or no LOCKSTEP_ADMIN_TOKEN configured"},
    409: {"model": ErrorBody, "description": "The job or release is in a state that forbids this"},
}


def error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "error_type": kind}, headers=headers)


def status_of(exc: LockstepError) -> tuple[int, str]:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal"


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request body is invalid"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LockstepError)
    async def _domain(_: Request, exc: LockstepError) -> JSONResponse:
        status, kind = status_of(exc)
        return error_response(status, str(exc), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "http")
        return error_response(exc.status_code, str(exc.detail), kind, getattr(exc, "headers", None))

    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        if is_storage_full(exc):
            log.error("no space left for %s %s: %s", request.method, request.url.path, exc)
            return error_response(507, f"the server's disk is full; nothing was written; {STORAGE_FULL_HINT}",
                                  "storage_full")
        return internal_error(request.method, request.url.path, exc)

    app.add_exception_handler(OSError, _storage)
    app.add_exception_handler(sqlite3.OperationalError, _storage)


def internal_error(method: str, path: str, exc: Exception) -> JSONResponse:
    """Log an unexpected error with its traceback and answer a uniform 500. `RequestLoggingMiddleware` sends it for
    errors no handler took, so the response and the log line keep the request's id."""
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log", "internal")
