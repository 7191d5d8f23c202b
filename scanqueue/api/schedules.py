"""The schedule routes under ``/api/v1/schedules`` (docs/reference.md#schedules).

``GET``/``POST /api/v1/schedules``, ``GET``/``DELETE /api/v1/schedules/{name}``
and ``POST /api/v1/schedules/{name}/pause|resume|run``, behind the same
guards as every ``/api/`` route (bearer token, loopback writes, JSON bodies).
A definition is validated by :func:`scanqueue.db.schedule_spec.validate_schedule`
— the CLI's validator — and a bad one answers 422 naming each field; a name
that exists answers 409, an unknown one 404 (the app's error handlers).
``run`` answers 201 with the scan it enqueued, as ``POST /api/v1/scans`` does.
Database calls run in the thread pool, never on the event loop.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.guards import RequestInvalid, error_response, read_json_body
from scanqueue.api.state import state_of
from scanqueue.db.rows import iso
from scanqueue.db.schedule_spec import ON_MISSED, ON_OVERLAP, InvalidSchedule, validate_schedule
from scanqueue.observe.event_sender import emit_standalone


def _name(request: Request) -> str:
    return str(request.path_params["name"])


async def list_schedules(request: Request) -> Response:
    rows = await run_in_threadpool(state_of(request).store.list_schedules)
    return JSONResponse({"schedules": [r.to_json() for r in rows]})


async def create_schedule(request: Request) -> Response:
    state = state_of(request)
    try:
        body = await read_json_body(request)
        spec = validate_schedule(body)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message)
    except InvalidSchedule as exc:
        return error_response(422, "invalid schedule", details=exc.details)
    row = await run_in_threadpool(state.store.add_schedule, spec)
    return JSONResponse(
        row.to_json(),
        status_code=201,
        headers={"Location": f"/api/v1/schedules/{quote(row.name, safe='')}"},
    )


async def get_schedule(request: Request) -> Response:
    row = await run_in_threadpool(state_of(request).store.get_schedule, _name(request))
    return JSONResponse(row.to_json())


async def delete_schedule(request: Request) -> Response:
    await run_in_threadpool(state_of(request).store.remove_schedule, _name(request))
    return Response(status_code=204)


async def pause_schedule(request: Request) -> Response:
    row = await run_in_threadpool(state_of(request).store.pause_schedule, _name(request))
    return JSONResponse(row.to_json())


async def resume_schedule(request: Request) -> Response:
    row = await run_in_threadpool(state_of(request).store.resume_schedule, _name(request))
    return JSONResponse(row.to_json())


async def run_schedule(request: Request) -> Response:
    state = state_of(request)
    schedule, scan_id, at = await run_in_threadpool(state.store.run_schedule_now, _name(request))
    await run_in_threadpool(
        emit_standalone,
        state.settings,
        "schedule.fired",
        scan_id,
        {"schedule": schedule.name, "scheduled_for": iso(at), "manual": True},
    )
    scan = await run_in_threadpool(state.store.get, scan_id)
    return JSONResponse(
        scan.to_json(), status_code=201, headers={"Location": f"/api/v1/scans/{scan_id}"}
    )


# -- the OpenAPI document's part (merged by scanqueue.api.openapi) ---------------------

_TEXT_OR_NULL: dict[str, Any] = {"type": ["string", "null"]}
_TIME_OR_NULL: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
_NAMES: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
_TIMING = {
    "cron": {
        "type": ["string", "null"],
        "description": "Five-field cron expression, read in `tz` (exactly one of cron and"
        " every_seconds)",
    },
    "every_seconds": {
        "type": ["integer", "null"],
        "minimum": 1,
        "description": "Period: fires on the multiples of it since the Unix epoch",
    },
    "tz": {"type": "string", "default": "UTC", "description": "IANA zone"},
    "providers": {**_NAMES, "minItems": 1},
    "frameworks": _NAMES,
    "priority": {"type": "integer", "default": 0},
    "key": _TEXT_OR_NULL,
    "on_missed": {"enum": list(ON_MISSED), "default": "once"},
    "on_overlap": {"enum": list(ON_OVERLAP), "default": "skip"},
}
SCHEMAS: dict[str, Any] = {
    "Schedule": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            **_TIMING,
            "paused": {"type": "boolean"},
            "next_run_at": _TIME_OR_NULL,
            "last_fired_at": _TIME_OR_NULL,
            "last_scan_id": _TEXT_OR_NULL,
            "created_at": {"type": "string", "format": "date-time"},
        },
        "required": ["name", "tz", "providers", "paused", "next_run_at"],
    },
    "ScheduleRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "providers"],
        "properties": {"name": {"type": "string"}, **_TIMING},
    },
}


def _answer(status: str, description: str, schema: str | None = None) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema or 'Error'}"}
    return {status: {"description": description, "content": {"application/json": {"schema": ref}}}}


_DENIED = {
    **_answer("401", "Missing or wrong bearer token"),
    **_answer("503", "The database is unreachable"),
}
_WRITE_DENIED = {
    **_DENIED,
    **_answer("403", "Without a token: a write whose Host or Origin is not a loopback name"),
}
_UNKNOWN = _answer("404", "No schedule with that name")
_NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _verb(summary: str, ok: dict[str, Any], *extra: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {**ok, **_WRITE_DENIED, **_UNKNOWN}
    for more in extra:
        responses.update(more)
    return {"post": {"summary": summary, "parameters": [_NAME_PARAM], "responses": responses}}


PATHS: dict[str, Any] = {
    "/api/v1/schedules": {
        "get": {
            "summary": "List schedules, with their next fire time",
            "responses": {
                "200": {
                    "description": "Every schedule, by name",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "schedules": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Schedule"},
                                    }
                                },
                            }
                        }
                    },
                },
                **_DENIED,
            },
        },
        "post": {
            "summary": "Add a schedule",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ScheduleRequest"}}
                },
            },
            "responses": {
                **_answer("201", "The schedule", "Schedule"),
                **_WRITE_DENIED,
                **_answer("400", "Malformed request"),
                **_answer("409", "A schedule with that name exists"),
                **_answer("413", "The body is larger than 1 MiB"),
                **_answer("415", "The body is not Content-Type: application/json"),
                **_answer("422", "A bad field: cron expression, zone, providers …"),
            },
        },
    },
    "/api/v1/schedules/{name}": {
        "get": {
            "summary": "One schedule",
            "parameters": [_NAME_PARAM],
            "responses": {**_answer("200", "The schedule", "Schedule"), **_DENIED, **_UNKNOWN},
        },
        "delete": {
            "summary": "Remove a schedule (the scans it made stay)",
            "parameters": [_NAME_PARAM],
            "responses": {"204": {"description": "Removed"}, **_WRITE_DENIED, **_UNKNOWN},
        },
    },
    "/api/v1/schedules/{name}/pause": _verb(
        "Stop firing a schedule", _answer("200", "The paused schedule", "Schedule")
    ),
    "/api/v1/schedules/{name}/resume": _verb(
        "Fire a paused schedule again, from its next fire time after now",
        _answer("200", "The schedule", "Schedule"),
    ),
    "/api/v1/schedules/{name}/run": _verb(
        "Enqueue the schedule's scan now (also when paused)",
        _answer("201", "The queued scan", "Scan"),
    ),
}
