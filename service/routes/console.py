"""The web console: a static page at `/` and its assets at `/console/{name}`, read from `service/console/`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from training.errors import NotFound

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", headers=HEADERS)


@router.get("/console/{name}")
async def asset(name: str) -> FileResponse:
    """One file of the console folder (no subfolders, nothing outside it)."""
    path = (CONSOLE_DIR / name).resolve()
    if path.parent != CONSOLE_DIR or not path.is_file():
        raise NotFound(f"the console has no file {name!r}")
    return FileResponse(path, headers=HEADERS)
