"""Refuse request bodies over `LOCKSTEP_MAX_REQUEST_BYTES` with 413 before the route sees them.

A declared `Content-Length` over the limit is answered at once; otherwise the body
is read here, counting as it streams, and refused as soon as it crosses the limit,
so no client can make the server buffer an unbounded (e.g. chunked) upload. The
answer carries the uniform error body (Starlette's own limiter answers plain text,
and an error raised from inside the app's receive would surface as a 400).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http_errors import error_response


class BodySizeLimit:
    """ASGI middleware answering 413 with the uniform error body for oversized requests."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (f"the request body is larger than LOCKSTEP_MAX_REQUEST_BYTES ({self.max_bytes} bytes); send less "
                   "per request (e.g. split a document batch) or raise the limit on the server")
        await error_response(413, message, "too_large", {"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # a truncated body must not reach the route as if whole
                await error_response(400, "the client disconnected before sending the whole body; nothing was done",
                                     "client_closed")(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
