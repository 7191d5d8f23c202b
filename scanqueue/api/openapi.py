"""``/openapi.json``: the OpenAPI 3.1 document of every route, kept beside them by hand."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api import findings, queue, schedules, timeline, webhooks
from scanqueue.db.schema import STATUSES


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


def _scan_schema() -> dict[str, Any]:
    text_or_null = {"type": ["string", "null"]}
    time_or_null = {"type": ["string", "null"], "format": "date-time"}
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "providers_scanned": {"type": "array", "items": {"type": "string"}},
            "frameworks_scanned": {"type": "array", "items": {"type": "string"}},
            "triggered_by_user": text_or_null,
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": time_or_null,
            "finished_at": time_or_null,
            "error": text_or_null,
            "findings_count": {"type": "integer"},
            "attempts": {"type": "integer"},
            "findings_new": {"type": ["integer", "null"]},
            "findings_fixed": {"type": ["integer", "null"]},
            "baseline_id": text_or_null,
            "priority": {"type": "integer"},
            "run_after": time_or_null,
            "scan_key": text_or_null,
            "schedule_name": text_or_null,
            "scheduled_for": time_or_null,
            "key": {"type": ["string", "null"], "description": "the effective key"},
            "timeout_seconds": {"type": ["integer", "null"]},
            "retries": {"type": "integer"},
            "labels": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
            "deduplicated": {"type": "boolean", "description": "only in enqueue answers"},
        },
        "required": ["id", "status", "created_at", "attempts"],
    }


def _responses(ok: tuple[str, str], *codes: str) -> dict[str, Any]:
    descriptions = {
        "400": "Malformed request",
        "401": "Missing or wrong bearer token",
        "403": "Without a token: a write whose Host or Origin is not a loopback name",
        "404": "No scan with that id",
        "409": "The scan already finished",
        "413": "The body is larger than 1 MiB",
        "415": "The body is not Content-Type: application/json",
        "422": "The request is well-formed but invalid",
        "503": "The database is unreachable",
    }
    out: dict[str, Any] = {
        ok[0]: {
            "description": ok[1],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Scan"}}},
        }
    }
    for code in codes:
        out[code] = {
            "description": descriptions[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return out


SCAN_ID_PARAM = {"name": "scan_id", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "scanqueue",
        "version": "1",
        "description": "Enqueue, inspect and cancel compliance scans; follow their events;"
        " schedule recurring scans.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Scan": _scan_schema(),
            "ScanRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["providers"],
                "properties": {
                    "providers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    "frameworks": {"type": "array", "items": {"type": "string"}},
                    "user": {"type": ["string", "null"]},
                    "priority": {"type": "integer", "description": "higher runs first"},
                    "key": {"type": "string", "description": "limits, dedup, pauses"},
                    "run_after": {
                        "type": "string",
                        "format": "date-time",
                        "description": "ISO-8601; without an offset: UTC",
                    },
                    "timeout_seconds": {"type": "integer", "minimum": 1},
                    "labels": {
                        "type": "object",
                        "maxProperties": 16,
                        "additionalProperties": {"type": "string", "maxLength": 200},
                    },
                    "unique": {
                        "type": "boolean",
                        "description": "answer the key's queued scan (200) instead of adding one",
                    },
                },
            },
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "details": {"type": "array"}},
                "required": ["error"],
            },
            **schedules.SCHEMAS,
            **queue.SCHEMAS,
            **findings.SCHEMAS,
            **webhooks.SCHEMAS,
            "Event": {
                "type": "object",
                "description": "Payload fields (attempt, message, percent, findings …) as well",
                "properties": {
                    "id": {"type": "string"},
                    "type": {"type": "string"},
                    "scan_id": {"type": "string"},
                    "at": {"type": "string", "format": "date-time"},
                    "attempt": {"type": "integer"},
                },
                "required": ["id", "type", "scan_id", "at"],
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Database and broker reachability",
                "security": [],
                "responses": {"200": {"description": "Healthy"}, "503": {"description": "Not"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Text exposition format"}},
            }
        },
        "/api/v1/scans": {
            "post": {
                "summary": "Enqueue a scan",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ScanRequest"}}
                    },
                },
                "responses": {
                    **_responses(
                        ("201", "The queued scan"), "400", "401", "403", "413", "415", "422", "503"
                    ),
                    "200": {
                        "description": "unique: the key's queued scan, deduplicated: true",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Scan"}}
                        },
                    },
                },
            },
            "get": {
                "summary": "List scans, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"enum": list(STATUSES)}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                    {"name": "key", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "q",
                        "in": "query",
                        "description": "text in the id, user, error, key or providers (any case)",
                        "schema": {"type": "string", "maxLength": 200},
                    },
                    {
                        "name": "label",
                        "in": "query",
                        "description": "K:V, repeatable; every one must match",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "explode": True,
                    },
                ],
                "responses": {
                    "200": {
                        "description": "One page of scans",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "scans": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Scan"},
                                        },
                                        "limit": {"type": "integer"},
                                        "offset": {"type": "integer"},
                                        "next_offset": {"type": ["integer", "null"]},
                                    },
                                }
                            }
                        },
                    },
                    "401": {"description": "Missing or wrong bearer token"},
                    "422": {"description": "Bad status, limit or offset"},
                },
            },
        },
        "/api/v1/scans/{scan_id}": {
            "get": {
                "summary": "One scan",
                "parameters": [SCAN_ID_PARAM],
                "responses": _responses(("200", "The scan"), "401", "404", "503"),
            }
        },
        "/api/v1/scans/{scan_id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running scan",
                "parameters": [SCAN_ID_PARAM],
                "responses": _responses(
                    ("200", "The canceled scan"), "401", "403", "404", "409", "503"
                ),
            }
        },
        "/api/v1/events": {
            "get": {
                "summary": "Scan events as Server-Sent Events",
                "description": (
                    "Each event has an `id:` and a `data:` line holding an Event object. "
                    "Without Last-Event-ID the stream starts now; with it, every retained "
                    "event after that id is replayed first. A comment is sent every 15 s."
                ),
                "parameters": [
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "scan_id", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "An endless event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": {"description": "Last-Event-ID is not an id of this stream"},
                    "401": {"description": "Missing or wrong bearer token"},
                    "503": {"description": "SCANQUEUE_SSE_MAX_SUBSCRIBERS streams are open"},
                },
            }
        },
        **timeline.PATHS,
        **schedules.PATHS,
        **queue.PATHS,
        **findings.PATHS,
        **webhooks.PATHS,
    },
}
