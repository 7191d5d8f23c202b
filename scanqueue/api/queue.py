"""The queue's routes (docs/reference.md#policies): ``GET /api/v1/queue``, pause/resume, per-key
limits.

* ``GET /api/v1/queue`` — the object ``scanqueue queue --json`` prints
  (:mod:`scanqueue.db.queue_view`).
* ``POST /api/v1/queue/pause`` / ``POST /api/v1/queue/resume`` — body
  ``{"key": "aws|soc2"}``, or ``{}`` / no body for the whole queue; answers
  ``{"key", "paused", "changed"}``.
* ``GET /api/v1/limits``, ``PUT /api/v1/limits/{key}`` (``{"max_running": N}``,
  0 = no limit for the key), ``DELETE /api/v1/limits/{key}`` (404 when none).

Behind the same guards as every ``/api/`` route (bearer token, loopback writes,
body limits); bad fields answer 422 naming the field.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.guards import RequestInvalid, error_response, read_json_body
from scanqueue.api.state import state_of
from scanqueue.db.keys import MAX_KEY_CHARS
from scanqueue.db.policies import MAX_LIMIT
from scanqueue.db.queue_view import queue_snapshot
from scanqueue.db.rows import iso
from scanqueue.db.schema import PAUSE_ALL
from scanqueue.dispatch.bridge import WORKER_STALE_AFTER_S


async def get_queue(request: Request) -> Response:
    state = state_of(request)
    snapshot = await run_in_threadpool(
        queue_snapshot, state.store, state.settings.max_running_per_key, WORKER_STALE_AFTER_S
    )
    return JSONResponse(snapshot)


def _key(value: Any, *, allow_all: bool) -> str:
    if value is None and allow_all:
        return PAUSE_ALL
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_KEY_CHARS
        or not value.isprintable()
        or value.strip() == PAUSE_ALL
    ):
        raise RequestInvalid(422, f"key must be a string of 1 to {MAX_KEY_CHARS} printable chars")
    return value.strip()


async def _optional_body(request: Request) -> dict[str, Any]:
    if not await request.body():
        return {}
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise RequestInvalid(422, "the body must be a JSON object")
    unknown = sorted(set(body) - {"key"})
    if unknown:
        raise RequestInvalid(422, f"{unknown[0]}: unknown field")
    return body


async def _pause_or_resume(request: Request, pause: bool) -> Response:
    state = state_of(request)
    try:
        body = await _optional_body(request)
        key = _key(body.get("key"), allow_all=True)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message, details=_field("key", exc))
    changed = await run_in_threadpool(state.store.pause if pause else state.store.resume, key)
    return JSONResponse(
        {"key": None if key == PAUSE_ALL else key, "paused": pause, "changed": changed}
    )


def _field(name: str, exc: RequestInvalid) -> list[dict[str, str]]:
    return [{"field": name, "message": exc.message}] if exc.status == 422 else []


async def pause_queue(request: Request) -> Response:
    return await _pause_or_resume(request, True)


async def resume_queue(request: Request) -> Response:
    return await _pause_or_resume(request, False)


async def list_limits(request: Request) -> Response:
    state = state_of(request)
    rows = await run_in_threadpool(state.store.limits)
    return JSONResponse(
        {
            "default": state.settings.max_running_per_key,
            "limits": [
                {
                    "key": r["key"],
                    "max_running": r["max_running"],
                    "updated_at": iso(r["updated_at"]),
                }
                for r in rows
            ],
        }
    )


async def put_limit(request: Request) -> Response:
    state = state_of(request)
    try:
        key = _key(request.path_params["key"], allow_all=False)
        body = await read_json_body(request)
        if not isinstance(body, dict) or set(body) != {"max_running"}:
            raise RequestInvalid(422, 'the body must be {"max_running": N}')
        n = body["max_running"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LIMIT:
            raise RequestInvalid(422, f"max_running must be a whole number from 0 to {MAX_LIMIT}")
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message, details=_field("max_running", exc))
    await run_in_threadpool(state.store.set_limit, key, n)
    return JSONResponse({"key": key, "max_running": n})


async def delete_limit(request: Request) -> Response:
    state = state_of(request)
    try:
        key = _key(request.path_params["key"], allow_all=False)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message, details=_field("key", exc))
    await run_in_threadpool(state.store.clear_limit, key)  # NotFoundError → 404
    return JSONResponse({"key": key, "cleared": True})


_ERR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_KEY_PARAM = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
_PAUSE_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"key": {"type": "string", "description": "omit: whole queue"}},
            }
        }
    },
}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


SCHEMAS: dict[str, Any] = {
    "Queue": {
        "type": "object",
        "description": "What `scanqueue queue --json` prints",
        "properties": {
            "depth": {"type": "integer"},
            "oldest_queued_age_s": {"type": "number"},
            "statuses": {"type": "object", "additionalProperties": {"type": "integer"}},
            "unknown_statuses": {"type": "object", "additionalProperties": {"type": "integer"}},
            "unknown_rows": {"type": "array"},
            "paused_all": {"type": "boolean"},
            "pauses": {"type": "array"},
            "default_limit": {"type": "integer"},
            "keys": {"type": "array"},
            "workers": {"type": "array"},
        },
    },
}

PATHS: dict[str, Any] = {
    "/api/v1/queue": {
        "get": {
            "summary": "Depth, statuses, pauses, per-key running and limits, live workers",
            "responses": {
                "200": _ok("The queue", {"$ref": "#/components/schemas/Queue"}),
                "401": {"description": "Missing or wrong bearer token"},
            },
        }
    },
    "/api/v1/queue/pause": {
        "post": {
            "summary": "Pause one key, or the whole queue (no key)",
            "requestBody": _PAUSE_BODY,
            "responses": {
                "200": _ok("Paused", {"type": "object"}),
                "422": {"description": "Bad key", "content": _ERR},
            },
        }
    },
    "/api/v1/queue/resume": {
        "post": {
            "summary": "Resume one key, or the whole queue (no key)",
            "requestBody": _PAUSE_BODY,
            "responses": {
                "200": _ok("Resumed", {"type": "object"}),
                "422": {"description": "Bad key", "content": _ERR},
            },
        }
    },
    "/api/v1/limits": {
        "get": {
            "summary": "Per-key limits and the default",
            "responses": {"200": _ok("The limits", {"type": "object"})},
        }
    },
    "/api/v1/limits/{key}": {
        "put": {
            "summary": "At most max_running scans of the key running at once (0: none)",
            "parameters": [_KEY_PARAM],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["max_running"],
                            "properties": {"max_running": {"type": "integer", "minimum": 0}},
                        }
                    }
                },
            },
            "responses": {
                "200": _ok("Set", {"type": "object"}),
                "422": {"description": "Bad key or max_running", "content": _ERR},
            },
        },
        "delete": {
            "summary": "Drop the key's limit (the default applies again)",
            "parameters": [_KEY_PARAM],
            "responses": {
                "200": _ok("Cleared", {"type": "object"}),
                "404": {"description": "No limit set for the key", "content": _ERR},
            },
        },
    },
}
