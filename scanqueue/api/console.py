"""The operator console (docs/reference.md#console): its pages and its files.

Every console address — ``/``, ``/scans/{id}``, ``/schedules``, ``/queue`` —
answers the same single page (``api/static/index.html``), which routes on the
path itself, so a reload or a shared link lands on the same view.  Its
JavaScript modules (``main.js`` and the views it imports) and styles come from
``/console/<file>`` (packaged with the wheel: no CDN, no build step), under a
Content-Security-Policy that allows this origin only.

The console has no credential of its own: with a token set, the page sends
``Authorization: Bearer …`` on every API call, the event stream included (read
with ``fetch()``, since an ``EventSource`` cannot send headers), like any client.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from scanqueue.api.guards import error_response

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
