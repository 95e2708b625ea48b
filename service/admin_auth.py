"""The admin token the jobs and admin routes require (`Authorization: Bearer <LOCKSTEP_ADMIN_TOKEN>`).

Missing credentials answer 401 with a `WWW-Authenticate` challenge, a wrong token
403; tokens are compared in constant time. With no token configured the routes
are closed (403) rather than open, so a forgotten setting never exposes them, and
the server refuses to listen beyond loopback without a strong token. `AdminGate`
checks the token before the request body is read, so an unauthenticated caller
learns nothing from validation errors and cannot make the server parse its upload.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import StateDep
from service.http_errors import error_response
from training.errors import InvalidInput

ADMIN_PREFIXES = ("/v1/admin", "/v1/jobs")


def admin_refusal(expected: SecretStr | None, authorization: str) -> HTTPException | None:
    """Why a request with this `Authorization` header may not use the admin routes, or None if it may."""
    if expected is None or not expected.get_secret_value():
        return HTTPException(403, "admin routes are disabled: set LOCKSTEP_ADMIN_TOKEN on the server to enable them")
    scheme, _, supplied = authorization.partition(" ")
    if scheme.lower() != "bearer" or not supplied.strip():
        return HTTPException(
            401, "send the admin token as `Authorization: Bearer <token>`", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(supplied.strip().encode(), expected.get_secret_value().encode()):
        return HTTPException(403, "the admin token is wrong")
    return None


async def require_admin(request: Request, state: StateDep) -> None:
    """Refuse the request unless it carries the admin token; async, as the check never blocks."""
    refusal = admin_refusal(state.settings.admin_token, request.headers.get("authorization", ""))
    if refusal is not None:
        raise refusal


AdminDep = Annotated[None, Depends(require_admin)]


class AdminGate:
    """ASGI middleware refusing unauthenticated requests to the admin and job routes before anything else runs."""

    def __init__(self, app: ASGIApp, token: SecretStr | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(ADMIN_PREFIXES) and scope["method"] != "OPTIONS":
            refusal = admin_refusal(self.token, Headers(scope=scope).get("authorization", ""))
            if refusal is not None:
                kind = "unauthorized" if refusal.status_code == 401 else "forbidden"
                response = error_response(refusal.status_code, refusal.detail, kind, refusal.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


PLACEHOLDER_WORDS = ("admin", "changeme", "change-me", "change_me", "replace", "example", "lockstep", "password",
                     "secret", "default", "your-token", "placeholder")
MIN_TOKEN_LENGTH = 16
MIN_DISTINCT_CHARACTERS = 8


def is_weak_token(value: str) -> bool:
    """True for a token too short, too repetitive, or built from a well-known placeholder word."""
    lowered = value.lower()
    return (len(value) < MIN_TOKEN_LENGTH or len(set(value)) < MIN_DISTINCT_CHARACTERS
            or any(word in lowered for word in PLACEHOLDER_WORDS))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: SecretStr | None) -> None:
    """Refuse to listen beyond loopback unless a strong admin token protects the admin routes."""
    if is_loopback(host):
        return
    value = token.get_secret_value() if token is not None else ""
    if not value:
        raise InvalidInput(f"refusing to serve on {host} without an admin token: set LOCKSTEP_ADMIN_TOKEN "
                           "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if is_weak_token(value):
        raise InvalidInput(f"refusing to serve on {host} with a weak or placeholder admin token: use at least "
                           f"{MIN_TOKEN_LENGTH} random characters in LOCKSTEP_ADMIN_TOKEN "
                           "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
