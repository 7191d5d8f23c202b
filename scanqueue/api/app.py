"""The ASGI app (Starlette): its route table, middleware and error answers
(docs/reference.md#commands).

Routes: ``/healthz``, ``/metrics`` (:mod:`~scanqueue.api.health`),
``/openapi.json`` (:mod:`~scanqueue.api.openapi`), the console's pages and
files (:mod:`~scanqueue.api.console`), a scan's
timeline and the recent activity (:mod:`~scanqueue.api.timeline`) and,
behind the optional bearer token, ``/api/v1/scans``
(create, list, get, cancel — :mod:`~scanqueue.api.scans`) and
``/api/v1/events`` (Server-Sent Events — :mod:`~scanqueue.api.sse`),
findings, diffs, providers and checks (:mod:`~scanqueue.api.findings`) and
``/api/v1/schedules`` (:mod:`~scanqueue.api.schedules`) and ``/api/v1/webhooks``
(:mod:`~scanqueue.api.webhooks`).  Requests
pass :mod:`~scanqueue.api.guards` first.  The store's errors become 404, 409,
503 and 500 answers here; :mod:`~scanqueue.api.serve` runs the app.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scanqueue.api.console import asset, page
from scanqueue.api.findings import get_diff, list_checks, list_findings, list_providers
from scanqueue.api.guards import BearerAuth, LoopbackWriteGuard, error_response
from scanqueue.api.health import healthz, metrics
from scanqueue.api.hub import HUB_WINDOW
from scanqueue.api.openapi import openapi
from scanqueue.api.queue import (
    delete_limit,
    get_queue,
    list_limits,
    pause_queue,
    put_limit,
    resume_queue,
)
from scanqueue.api.request_metrics import RequestMetrics
from scanqueue.api.scans import cancel_scan, create_scan, get_scan, list_scans
from scanqueue.api.schedules import (
    create_schedule,
    delete_schedule,
    get_schedule,
    list_schedules,
    pause_schedule,
    resume_schedule,
    run_schedule,
)
from scanqueue.api.sse import HEARTBEAT_S, stream_events
from scanqueue.api.state import AppState
from scanqueue.api.timeline import recent_activity, scan_events
from scanqueue.api.webhooks import (
    create_webhook,
    delete_webhook_by_id,
    delete_webhook_by_url,
    list_webhooks,
)
from scanqueue.config import Settings
from scanqueue.errors import ConflictError, NotFoundError, ScanqueueError, UnavailableError


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, str(exc))


async def _conflict(request: Request, exc: Exception) -> Response:
    return error_response(409, str(exc))


async def _unavailable(request: Request, exc: Exception) -> Response:
    return error_response(503, str(exc))


async def _scanqueue_error(request: Request, exc: Exception) -> Response:
    return error_response(500, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(
    settings: Settings | None = None,
    *,
    heartbeat_s: float = HEARTBEAT_S,
    hub_window: int = HUB_WINDOW,
) -> Starlette:
    """The ASGI app for ``settings`` (read from the environment when omitted)."""
    settings = settings or Settings.from_env()
    state = AppState(settings, heartbeat_s, hub_window)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.close()

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/scans/{scan_id}", page, methods=["GET"]),
            Route("/schedules", page, methods=["GET"]),
            Route("/queue", page, methods=["GET"]),
            Route("/console/{name}", asset, methods=["GET"]),
            Route("/api/v1/activity", recent_activity, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/api/v1/scans", create_scan, methods=["POST"]),
            Route("/api/v1/scans", list_scans, methods=["GET"]),
            Route("/api/v1/scans/{scan_id}", get_scan, methods=["GET"]),
            Route("/api/v1/scans/{scan_id}/cancel", cancel_scan, methods=["POST"]),
            Route("/api/v1/scans/{scan_id}/events", scan_events, methods=["GET"]),
            Route("/api/v1/scans/{scan_id}/findings", list_findings, methods=["GET"]),
            Route("/api/v1/scans/{scan_id}/diff", get_diff, methods=["GET"]),
            Route("/api/v1/providers", list_providers, methods=["GET"]),
            Route("/api/v1/checks", list_checks, methods=["GET"]),
            Route("/api/v1/events", stream_events, methods=["GET"]),
            Route("/api/v1/queue", get_queue, methods=["GET"]),
            Route("/api/v1/queue/pause", pause_queue, methods=["POST"]),
            Route("/api/v1/queue/resume", resume_queue, methods=["POST"]),
            Route("/api/v1/limits", list_limits, methods=["GET"]),
            Route("/api/v1/limits/{key:path}", put_limit, methods=["PUT"]),
            Route("/api/v1/limits/{key:path}", delete_limit, methods=["DELETE"]),
            Route("/api/v1/schedules", list_schedules, methods=["GET"]),
            Route("/api/v1/schedules", create_schedule, methods=["POST"]),
            Route("/api/v1/schedules/{name}", get_schedule, methods=["GET"]),
            Route("/api/v1/schedules/{name}", delete_schedule, methods=["DELETE"]),
            Route("/api/v1/schedules/{name}/pause", pause_schedule, methods=["POST"]),
            Route("/api/v1/schedules/{name}/resume", resume_schedule, methods=["POST"]),
            Route("/api/v1/schedules/{name}/run", run_schedule, methods=["POST"]),
            Route("/api/v1/webhooks", list_webhooks, methods=["GET"]),
            Route("/api/v1/webhooks", create_webhook, methods=["POST"]),
            Route("/api/v1/webhooks", delete_webhook_by_url, methods=["DELETE"]),
            Route("/api/v1/webhooks/{webhook_id}", delete_webhook_by_id, methods=["DELETE"]),
        ],
        middleware=[
            Middleware(RequestMetrics),
            Middleware(LoopbackWriteGuard, token=settings.api_token),
            Middleware(BearerAuth, token=settings.api_token),
        ],
        exception_handlers={
            NotFoundError: _not_found,
            ConflictError: _conflict,
            UnavailableError: _unavailable,
            ScanqueueError: _scanqueue_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
    app.state.scanqueue = state
    return app
