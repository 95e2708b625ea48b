"""The admin token the jobs and admin routes require (`Authorization: Bearer <LOCKSTEP_ADMIN_TOKEN>`).

Missing credentials answer 401 with a `WWW-Authenticate` challenge, a wrong token
403; tokens are compared in constant time. With no token configured the routes
are closed (403) rather than open, so a forgotten setting never exposes them.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.deps import get_state


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
