"""The admin token the jobs and admin routes require (`Authorization: Bearer <LOCKSTEP_ADMIN_TOKEN>`).

Missing credentials answer 401 with a `WWW-Authenticate` challenge, a wrong token
403; tokens are compared in constant time. With no token configured the routes
are closed (403) rather than open, so a forgotten setting never exposes them, and
the server refuses to listen beyond loopback without a strong token.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from pydantic import SecretStr

from service.deps import get_state
from training.errors import InvalidInput


def require_admin(request: Request) -> None:
    expected = get_state(request).settings.admin_token
    if expected is None or not expected.get_secret_value():
        raise HTTPException(403, "admin routes are disabled: set LOCKSTEP_ADMIN_TOKEN on the server to enable them")
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not supplied.strip():
        raise HTTPException(
            401, "send the admin token as `Authorization: Bearer <token>`", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(supplied.strip().encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, "the admin token is wrong")


AdminDep = Annotated[None, Depends(require_admin)]


WELL_KNOWN_TOKENS = frozenset({"admin", "changeme", "change-me", "lockstep", "password", "secret", "test", "token"})
MIN_TOKEN_LENGTH = 16


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
    if value.lower() in WELL_KNOWN_TOKENS or len(value) < MIN_TOKEN_LENGTH:
        raise InvalidInput(f"refusing to serve on {host} with a weak admin token: use at least {MIN_TOKEN_LENGTH} "
                           "random characters in LOCKSTEP_ADMIN_TOKEN")
