"""Structured logs: one JSON object per line, and a request id on every request, its response and its log lines.

The middleware takes the caller's `X-Request-ID` (when it is a short token) or makes
one, returns it in the response header, keeps it in a context variable so every
line logged while the request is handled carries it, and writes one access line per
request with the method, path, route template, status and duration. An error no
handler took becomes the uniform 500 here, inside the request's id, so that answer
and its logged traceback carry the id too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http_errors import internal_error
from service.metrics import route_template

HEADER = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_LEFT_OUT = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("lockstep.access")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, request id and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (current := request_id.get()) is not None:
            entry["request_id"] = current
        entry.update({k: v for k, v in vars(record).items() if k not in _LEFT_OUT and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str) -> None:
    """Send every logger's records, and Python warnings, to stderr as JSON lines at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def run_with_json_logs(app: ASGIApp, host: str, port: int, level: str) -> None:
    """Serve `app` with uvicorn, its own lines and ours as JSON; the middleware writes the access lines."""
    import uvicorn

    configure_json_logging(level)
    uvicorn.run(app, host=host, port=port, log_level=level, log_config=None, access_log=False)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER.encode():
            supplied = value.decode("latin-1")
            return supplied if _VALID_ID.fullmatch(supplied) else None
    return None


class RequestLoggingMiddleware:
    """Assigns or propagates `X-Request-ID` and logs one access line per HTTP request."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        """`routes` label requests refused before routing (see `route_template`)."""
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        current = _incoming_id(scope) or uuid.uuid4().hex
        token = request_id.set(current)
        started = time.perf_counter()
        status, responded = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), current.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if responded:
                raise
            await internal_error(scope["method"], scope["path"], exc)(scope, receive, send_with_id)
        finally:
            route = route_template(scope, self.routes)
            access_log.info(
                "%s %s %d", scope["method"], scope["path"], status,
                extra={"method": scope["method"], "path": scope["path"], "route": route, "status": status,
                       "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
                       "client": scope["client"][0] if scope.get("client") else None},
            )
            request_id.reset(token)
