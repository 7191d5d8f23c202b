"""Findings over time and the real runner's tables, read over HTTP
(docs/reference.md#findings-over-time).

- ``GET /api/v1/scans/{id}/findings?state=&limit=&offset=``: a page of what
  the scan found, in the order stored (``state`` one of new, reopened,
  unchanged, fixed; without it, every finding but the ``fixed`` ones);
- ``GET /api/v1/scans/{id}/diff``: the scan against its baseline, the same
  object as ``scanqueue diff ID --json`` (409 while it has none);
- ``GET /api/v1/providers``: each provider with its config masked
  (:func:`~scanqueue.runners.providers.base.masked_config`: every ``env``
  value and anything whose key looks secret shows as ``***``);
- ``GET /api/v1/checks``: checks with a recorded state.

Behind the same guards as every ``/api/`` route; unknown scan ids answer 404,
bad query parameters 422 naming the parameter.  Database calls run in the
thread pool.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.guards import RequestInvalid, error_response, int_param
from scanqueue.api.state import state_of
from scanqueue.runners.diff import FINDING_STATES
from scanqueue.runners.diff_view import read_diff
from scanqueue.runners.providers.base import masked_config
from scanqueue.runners.store import RunnerStore

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_OFFSET = 10**9


def _runner_store(request: Request) -> RunnerStore:
    return RunnerStore(state_of(request).store)


def _findings_page(
    rs: RunnerStore, scan_id: str, state: str | None, limit: int, offset: int
) -> dict[str, Any]:
    rs.store.get(scan_id)  # NotFoundError → 404
    rows = rs.list_findings(scan_id, state, limit=limit, offset=offset)
    total = rs.count_findings(scan_id, state)
    return {
        "scan_id": scan_id,
        "state": state,
        "findings": [r.to_json() for r in rows],
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if offset + limit < total else None,
    }


async def list_findings(request: Request) -> Response:
    state = request.query_params.get("state") or None
    try:
        if state is not None and state not in FINDING_STATES:
            raise RequestInvalid(422, f"state must be one of {', '.join(FINDING_STATES)}")
        limit = int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = int_param(request, "offset", 0, 0, MAX_OFFSET)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message)
    page = await run_in_threadpool(
        _findings_page, _runner_store(request), request.path_params["scan_id"], state, limit, offset
    )
    return JSONResponse(page)


async def get_diff(request: Request) -> Response:
    view = await run_in_threadpool(
        read_diff, _runner_store(request), request.path_params["scan_id"]
    )
    return JSONResponse(view.to_json())


def _providers(rs: RunnerStore) -> list[dict[str, Any]]:
    shown = []
    for row in rs.list_providers():
        item = row.to_json()
        item["config"] = masked_config(row.config)
        shown.append(item)
    return shown


async def list_providers(request: Request) -> Response:
    return JSONResponse({"providers": await run_in_threadpool(_providers, _runner_store(request))})


async def list_checks(request: Request) -> Response:
    rows = await run_in_threadpool(_runner_store(request).list_checks)
    return JSONResponse({"checks": [r.to_json() for r in rows]})


# -- the OpenAPI document's part (merged into scanqueue.api.openapi) ---------------------

_TEXT_OR_NULL = {"type": ["string", "null"]}
_SCAN_ID = {"name": "scan_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _ok(description: str, ref: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _array_of(ref: str) -> dict[str, Any]:
    return {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}


SCHEMAS: dict[str, Any] = {
    "Finding": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "scan_id": {"type": "string"},
            "check_id": {"type": "string"},
            "provider": {"type": "string"},
            "severity": _TEXT_OR_NULL,
            "status": _TEXT_OR_NULL,
            "resource": _TEXT_OR_NULL,
            "location": _TEXT_OR_NULL,
            "title": _TEXT_OR_NULL,
            "message": _TEXT_OR_NULL,
            "frameworks": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": ["string", "null"], "format": "date-time"},
            "fingerprint": _TEXT_OR_NULL,
            "state": {"enum": [*FINDING_STATES, None]},
        },
        "required": ["id", "scan_id", "check_id", "provider"],
    },
    "FindingsPage": {
        "type": "object",
        "properties": {
            "scan_id": {"type": "string"},
            "state": {"enum": [*FINDING_STATES, None]},
            "findings": _array_of("Finding"),
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next_offset": {"type": ["integer", "null"]},
        },
    },
    "Diff": {
        "type": "object",
        "properties": {
            "scan_id": {"type": "string"},
            "baseline_id": _TEXT_OR_NULL,
            "new": _array_of("Finding"),
            "fixed": _array_of("Finding"),
            "reopened": _array_of("Finding"),
            "unchanged": {"type": "integer"},
        },
        "required": ["scan_id", "baseline_id", "new", "fixed", "reopened", "unchanged"],
    },
    "Provider": {
        "type": "object",
        "description": "config with every env value and anything secret shown as ***",
        "properties": {
            "name": {"type": "string"},
            "kind": {"type": "string"},
            "config": {},
            "enabled": {"type": "boolean"},
            "created_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "Check": {
        "type": "object",
        "properties": {
            "check_id": {"type": "string"},
            "enabled": {"type": "boolean"},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
}

PATHS: dict[str, Any] = {
    "/api/v1/scans/{scan_id}/findings": {
        "get": {
            "summary": "A page of a scan's findings, optionally in one diff state",
            "parameters": [
                _SCAN_ID,
                {"name": "state", "in": "query", "schema": {"enum": list(FINDING_STATES)}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "maximum": MAX_PAGE},
                },
                {"name": "offset", "in": "query", "schema": {"type": "integer"}},
            ],
            "responses": {
                "200": _ok("One page of findings", "FindingsPage"),
                "401": {"description": "Missing or wrong bearer token"},
                "404": {"description": "No scan with that id"},
                "422": {"description": "Bad state, limit or offset"},
            },
        }
    },
    "/api/v1/scans/{scan_id}/diff": {
        "get": {
            "summary": "The scan against its baseline: new, fixed, reopened, unchanged",
            "parameters": [_SCAN_ID],
            "responses": {
                "200": _ok("The diff", "Diff"),
                "401": {"description": "Missing or wrong bearer token"},
                "404": {"description": "No scan with that id"},
                "409": {"description": "The scan has no diff (it has not completed)"},
            },
        }
    },
    "/api/v1/providers": {
        "get": {
            "summary": "Providers, secrets masked",
            "responses": {
                "200": {
                    "description": "Every provider",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"providers": _array_of("Provider")},
                            }
                        }
                    },
                },
                "401": {"description": "Missing or wrong bearer token"},
            },
        }
    },
    "/api/v1/checks": {
        "get": {
            "summary": "Checks with a recorded state (enabled or disabled)",
            "responses": {
                "200": {
                    "description": "Every recorded check",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"checks": _array_of("Check")},
                            }
                        }
                    },
                },
                "401": {"description": "Missing or wrong bearer token"},
            },
        }
    },
}
