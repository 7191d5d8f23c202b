"""The operator console (CONTRACT §10): its pages, its files and its session cookie.

Every console address — ``/``, ``/scans/{id}``, ``/schedules``, ``/queue`` —
answers the same single page (``api/static/index.html``), which routes on the
path itself, so a reload or a shared link lands on the same view.  Its
JavaScript modules (``main.js`` and the views it imports) and styles come from
``/console/<file>`` (packaged with the wheel: no CDN, no build step), under a
Content-Security-Policy that allows this origin only.

``POST /api/v1/session`` (bearer token required, like every write) sets the
short-lived cookie of :mod:`~scanqueue.api.session`, which lets the page's
``EventSource`` and its reads through; ``DELETE`` clears it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from scanqueue.api.guards import error_response
from scanqueue.api.session import SESSION_TTL_S, make_session, session_cookie_header
from scanqueue.api.state import state_of
from scanqueue.db.rows import iso

MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# The files /console/<name> serves: the page's modules and styles, nothing else.
ASSETS = {
    entry.name: MEDIA_TYPES[Path(entry.name).suffix]
    for entry in resources.files("scanqueue.api").joinpath("static").iterdir()
    if Path(entry.name).suffix in MEDIA_TYPES
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _static(name: str) -> str:
    return resources.files("scanqueue.api").joinpath(f"static/{name}").read_text("utf-8")


async def page(request: Request) -> Response:
    """The console's one page, for every console address."""
    return HTMLResponse(
        _static("index.html"), headers={"Cache-Control": "no-cache", **SECURITY_HEADERS}
    )


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = ASSETS.get(name)
    if media_type is None:
        return error_response(404, f"no console file {name!r}")
    return Response(
        _static(name),
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


async def open_session(request: Request) -> Response:
    """Trade the bearer token (already checked by BearerAuth) for a read-only cookie."""
    settings = state_of(request).settings
    if not settings.api_token:
        return JSONResponse({"auth": False, "expires_at": None})
    now = time.time()
    value = make_session(settings.api_token.encode(), now)
    expires = iso_at(now + SESSION_TTL_S)
    header = session_cookie_header(value, SESSION_TTL_S, secure=request.url.scheme == "https")
    return JSONResponse(
        {"auth": True, "expires_at": expires, "ttl_s": SESSION_TTL_S},
        headers={"Set-Cookie": header, "Cache-Control": "no-store"},
    )


async def close_session(request: Request) -> Response:
    header = session_cookie_header("", 0, secure=request.url.scheme == "https")
    return Response(status_code=204, headers={"Set-Cookie": header})


def iso_at(epoch_s: float) -> str | None:
    return iso(datetime.fromtimestamp(epoch_s, UTC))


# -- the OpenAPI document's part (merged by scanqueue.api.openapi) ---------------------

PATHS: dict[str, Any] = {
    "/api/v1/session": {
        "post": {
            "summary": "Trade the bearer token for the console's read-only session cookie",
            "description": (
                "Sets `scanqueue_session` (HttpOnly, SameSite=Strict, Path=/api/, one hour): "
                "an expiry and an HMAC of it under the token, never the token. GET and HEAD "
                "requests under /api/ (the event stream and reads) accept it instead of the "
                "Authorization header; writes never do. Without a token configured it sets "
                "nothing and answers auth: false."
            ),
            "responses": {
                "200": {
                    "description": "The cookie is set (Set-Cookie)",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "auth": {"type": "boolean"},
                                    "expires_at": {"type": ["string", "null"]},
                                    "ttl_s": {"type": "integer"},
                                },
                            }
                        }
                    },
                },
                "401": {"description": "Missing or wrong bearer token"},
            },
        },
        "delete": {
            "summary": "Clear the session cookie",
            "responses": {
                "204": {"description": "Cleared"},
                "401": {"description": "Missing or wrong bearer token"},
            },
        },
    },
}
