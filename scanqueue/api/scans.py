"""The scan routes under ``/api/v1/scans``: create, get, list (newest first), cancel.

A new scan's body is read by :func:`scanqueue.api.guards.read_json_body` and
validated by :mod:`scanqueue.db.scan_request` (422 with details) — the policy
fields too (``priority``, ``key``, ``run_after``, ``timeout_seconds``,
``labels``, ``unique``).  A new scan answers 201; with ``"unique": true`` the
answer also carries ``"deduplicated"``: true (status 200) when it is the queued
scan of the same key, false (201) when it was inserted.  The list filters by
``status``, ``key`` and ``label=K:V`` (repeatable, all must match).  Database
calls run in the thread pool, never on the event loop.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.guards import RequestInvalid, error_response, int_param, read_json_body
from scanqueue.api.state import state_of
from scanqueue.db.scan_request import (
    InvalidScanRequest,
    parse_label_filter,
    validate_scan_request,
)
from scanqueue.db.schema import STATUSES
from scanqueue.observe.event_sender import emit_standalone

DEFAULT_PAGE = 50
MAX_PAGE = 1000
MAX_SEARCH_CHARS = 200  # ``q``, the text filter


async def create_scan(request: Request) -> Response:
    state = state_of(request)
    try:
        body = await read_json_body(request)
        scan = validate_scan_request(body)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message)
    except InvalidScanRequest as exc:
        return error_response(422, "invalid scan request", details=exc.details)
    row, deduplicated = await run_in_threadpool(state.store.enqueue_request, scan)
    shown = row.to_json()
    if scan.unique:  # asked for dedup: say whether it happened
        shown["deduplicated"] = deduplicated
    return JSONResponse(
        shown,
        status_code=200 if deduplicated else 201,
        headers={"Location": f"/api/v1/scans/{row.id}"},
    )


async def get_scan(request: Request) -> Response:
    row = await run_in_threadpool(state_of(request).store.get, request.path_params["scan_id"])
    return JSONResponse(row.to_json())


async def list_scans(request: Request) -> Response:
    status = request.query_params.get("status") or None
    try:
        if status is not None and status not in STATUSES:
            raise RequestInvalid(422, f"status must be one of {', '.join(STATUSES)}")
        limit = int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = int_param(request, "offset", 0, 0, 10**9)
        details: list[dict[str, str]] = []
        labels = parse_label_filter(request.query_params.getlist("label"), ":", details, "label")
        if details:
            return error_response(422, details[0]["message"], details=details)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message)
    key = request.query_params.get("key") or None
    search = request.query_params.get("q") or None
    if search is not None and len(search) > MAX_SEARCH_CHARS:
        return error_response(422, f"q must be at most {MAX_SEARCH_CHARS} characters")
    rows = await run_in_threadpool(
        lambda: state_of(request).store.list_scans(
            status, limit, offset, key=key, labels=labels or None, search=search
        )
    )
    return JSONResponse(
        {
            "scans": [r.to_json() for r in rows],
            "limit": limit,
            "offset": offset,
            "next_offset": offset + limit if len(rows) == limit else None,
        }
    )


async def cancel_scan(request: Request) -> Response:
    state = state_of(request)
    row = await run_in_threadpool(state.store.cancel, request.path_params["scan_id"])
    await run_in_threadpool(
        emit_standalone, state.settings, "scan.canceled", row.id, {"reason": row.error}
    )
    return JSONResponse(row.to_json())
