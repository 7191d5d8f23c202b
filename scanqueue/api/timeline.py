"""Read routes the console draws from: a scan's timeline and the recent activity.

``GET /api/v1/scans/{id}/events`` — the scan's retained events, oldest first,
from the durable event log (:mod:`~scanqueue.observe.event_history`), with
the worker that ran it.  ``GET /api/v1/activity?minutes=N`` — rows per status,
per minute of the last N (default 60) scans finished by outcome and pickup
latency (:mod:`~scanqueue.db.activity`), and the event stream's newest id.
Both are reads, behind the bearer token like every ``/api/`` route.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.guards import error_response
from scanqueue.api.state import AppState, state_of
from scanqueue.db.activity import activity, worker_of
from scanqueue.db.schema import STATUSES
from scanqueue.observe.event_history import DEFAULT_LIMIT, events_of_scan

DEFAULT_MINUTES = 60
MAX_MINUTES = 24 * 60
ACTIVITY_CACHE_S = 2.0  # seconds one /api/v1/activity answer is reused

_activity_cache: dict[tuple[int, int], tuple[float, dict[str, Any]]] = {}


async def scan_events(request: Request) -> Response:
    state = state_of(request)
    row = await run_in_threadpool(state.store.get, request.path_params["scan_id"])
    raw_limit = request.query_params.get("limit", "")
    limit = DEFAULT_LIMIT
    if raw_limit:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= DEFAULT_LIMIT:
            return error_response(422, f"limit must be from 1 to {DEFAULT_LIMIT}")
        limit = int(raw_limit)
    found = await run_in_threadpool(events_of_scan, state.sink, row.id, row.created_at, limit)
    worker = await run_in_threadpool(worker_of, state.store, row.id)
    return JSONResponse({"scan_id": row.id, "events": [e.data for e in found], "worker": worker})


async def recent_activity(request: Request) -> Response:
    state = state_of(request)
    raw = request.query_params.get("minutes", "")
    minutes = DEFAULT_MINUTES
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_MINUTES:
            return error_response(422, f"minutes must be from 1 to {MAX_MINUTES}")
        minutes = int(raw)
    # Every open console polls this; the window's rows are read at most once per
    # ACTIVITY_CACHE_S per server, however many consoles are open.
    cache_key = (id(state), minutes)
    cached = _activity_cache.get(cache_key)
    if cached is not None and time.monotonic() - cached[0] < ACTIVITY_CACHE_S:
        return JSONResponse(cached[1])
    answer = await _activity(state, minutes)
    _activity_cache[cache_key] = (time.monotonic(), answer)
    return JSONResponse(answer)


async def _activity(state: AppState, minutes: int) -> dict[str, Any]:
    counts = await run_in_threadpool(state.store.count_by_status)
    buckets = await run_in_threadpool(activity, state.store, minutes)
    statuses = {status: counts.get(status, 0) for status in STATUSES}
    statuses["unknown"] = sum(n for s, n in counts.items() if s not in STATUSES)
    try:
        # Where the event stream stands: a console that subscribes with this id
        # (``?last_event_id=``) misses nothing that happens from here on, even if its
        # first connection drops before any event reached it.
        last_event_id: str | None = await run_in_threadpool(state.sink.last_id)
    except Exception:
        last_event_id = None
    return {
        "counts": statuses,
        "minutes": [b.to_json() for b in buckets],
        "window": minutes,
        "last_event_id": last_event_id,
    }


# -- the OpenAPI document's part (merged by scanqueue.api.openapi) ---------------------

_INT = {"type": "integer"}
_SECONDS_OR_NULL = {"type": ["number", "null"]}
PATHS: dict[str, Any] = {
    "/api/v1/scans/{scan_id}/events": {
        "get": {
            "summary": "A scan's retained events, oldest first, and the worker that ran it",
            "parameters": [
                {"name": "scan_id", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 500}},
            ],
            "responses": {
                "200": {
                    "description": "The timeline",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "scan_id": {"type": "string"},
                                    "events": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Event"},
                                    },
                                    "worker": {
                                        "type": ["object", "null"],
                                        "description": "id, hostname, pid, slots, heartbeat_at",
                                    },
                                },
                            }
                        }
                    },
                },
                "401": {"description": "Missing or wrong bearer token"},
                "404": {"description": "No scan with that id"},
            },
        }
    },
    "/api/v1/activity": {
        "get": {
            "summary": "Rows per status, and per minute: scans finished and pickup latency",
            "parameters": [
                {"name": "minutes", "in": "query", "schema": {"type": "integer", "maximum": 1440}}
            ],
            "responses": {
                "200": {
                    "description": "Counts and one bucket per minute, oldest first",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "counts": {"type": "object", "additionalProperties": _INT},
                                    "window": _INT,
                                    "last_event_id": {"type": ["string", "null"]},
                                    "minutes": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "at": {"type": "string", "format": "date-time"},
                                                "completed": _INT,
                                                "failed": _INT,
                                                "canceled": _INT,
                                                "started": _INT,
                                                "pickup_mean_s": _SECONDS_OR_NULL,
                                                "pickup_max_s": _SECONDS_OR_NULL,
                                            },
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "401": {"description": "Missing or wrong bearer token"},
                "422": {"description": "minutes out of range"},
            },
        }
    },
}
