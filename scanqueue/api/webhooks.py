"""The webhook routes under ``/api/v1/webhooks`` (docs/reference.md#webhooks).

``GET /api/v1/webhooks`` lists receivers (never their secrets; a URL's password
masked), ``POST`` adds one (``{"url", "secret", "events"?, "only_new_findings"?}``;
201 with the webhook, 409 when the URL exists, 422 naming each bad field), and
``DELETE /api/v1/webhooks?url=URL`` or ``DELETE /api/v1/webhooks/{id}`` removes
one with its pending deliveries (204; 404 unknown).  The same guards as every
``/api/`` route apply (bearer token, loopback writes, JSON bodies).  The body
is validated by :func:`scanqueue.db.webhook_spec.validate_webhook`, the CLI's
validator.  Database calls run in the thread pool.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.guards import RequestInvalid, error_response, read_json_body
from scanqueue.api.state import state_of
from scanqueue.db.webhook_spec import DEFAULT_EVENTS, InvalidWebhook, validate_webhook


async def list_webhooks(request: Request) -> Response:
    rows = await run_in_threadpool(state_of(request).store.list_webhooks)
    return JSONResponse({"webhooks": [r.to_json() for r in rows]})


async def create_webhook(request: Request) -> Response:
    state = state_of(request)
    try:
        body = await read_json_body(request)
        spec = validate_webhook(body)
    except RequestInvalid as exc:
        return error_response(exc.status, exc.message)
    except InvalidWebhook as exc:
        return error_response(422, "invalid webhook", details=exc.details)
    row = await run_in_threadpool(state.store.add_webhook, spec)
    return JSONResponse(
        row.to_json(), status_code=201, headers={"Location": f"/api/v1/webhooks/{row.id}"}
    )


async def delete_webhook_by_url(request: Request) -> Response:
    url = request.query_params.get("url")
    if not url:
        return error_response(
            422,
            "give the webhook's url as ?url=… (or DELETE /api/v1/webhooks/{id})",
            details=[{"field": "url", "message": "required"}],
        )
    store = state_of(request).store
    await run_in_threadpool(lambda: store.remove_webhook(url=url))
    return Response(status_code=204)


async def delete_webhook_by_id(request: Request) -> Response:
    raw = str(request.path_params["webhook_id"])
    if not raw.isdigit() or len(raw) > 18:
        return error_response(
            422,
            f"webhook id must be a whole number, got {raw[:40]!r}",
            details=[{"field": "webhook_id", "message": "expected a whole number"}],
        )
    store = state_of(request).store
    await run_in_threadpool(lambda: store.remove_webhook(webhook_id=int(raw)))
    return Response(status_code=204)


# -- the OpenAPI document's part (merged by scanqueue.api.openapi) ---------------------

_EVENTS: dict[str, Any] = {
    "type": "array",
    "items": {"enum": list(DEFAULT_EVENTS)},
    "description": "Statuses to send (or one comma-separated string); default all three",
}
SCHEMAS: dict[str, Any] = {
    "Webhook": {
        "type": "object",
        "description": "Never the secret; a password in the URL shown as ***",
        "properties": {
            "id": {"type": "integer"},
            "url": {"type": "string"},
            "events": _EVENTS,
            "only_new_findings": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
            "deliveries": {
                "type": "object",
                "properties": {
                    "pending": {"type": "integer"},
                    "delivered": {"type": "integer"},
                    "given_up": {"type": "integer"},
                },
            },
        },
        "required": ["id", "url", "events", "only_new_findings"],
    },
    "WebhookRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["url", "secret"],
        "properties": {
            "url": {"type": "string", "description": "http:// or https://"},
            "secret": {"type": "string", "minLength": 1, "maxLength": 1000},
            "events": _EVENTS,
            "only_new_findings": {"type": "boolean", "default": False},
        },
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
_REMOVED = {"204": {"description": "Removed, with its pending deliveries"}}

PATHS: dict[str, Any] = {
    "/api/v1/webhooks": {
        "get": {
            "summary": "List webhooks (never their secrets)",
            "responses": {
                "200": {
                    "description": "Every webhook, oldest first",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "webhooks": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Webhook"},
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
            "summary": "Add a webhook: finished scans POSTed to it, signed with the secret",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/WebhookRequest"}}
                },
            },
            "responses": {
                **_answer("201", "The webhook", "Webhook"),
                **_WRITE_DENIED,
                **_answer("400", "Malformed request"),
                **_answer("409", "A webhook for that URL exists"),
                **_answer("413", "The body is larger than 1 MiB"),
                **_answer("415", "The body is not Content-Type: application/json"),
                **_answer("422", "Bad fields (details names each)"),
            },
        },
        "delete": {
            "summary": "Remove the webhook for ?url=",
            "parameters": [
                {"name": "url", "in": "query", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                **_REMOVED,
                **_WRITE_DENIED,
                **_answer("404", "No webhook for that URL"),
                **_answer("422", "No url given"),
            },
        },
    },
    "/api/v1/webhooks/{webhook_id}": {
        "delete": {
            "summary": "Remove a webhook by id",
            "parameters": [
                {
                    "name": "webhook_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer"},
                }
            ],
            "responses": {
                **_REMOVED,
                **_WRITE_DENIED,
                **_answer("404", "No webhook with that id"),
                **_answer("422", "Not a whole number"),
            },
        }
    },
}
