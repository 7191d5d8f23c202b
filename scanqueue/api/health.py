"""``/healthz`` and ``/metrics``: what probes and Prometheus read, without the token.

``/healthz`` says ok or unavailable per dependency (database, Redis, a
separate broker) and logs the reasons, never returning hosts, URLs or errors.
``/metrics`` is the Prometheus exposition from :mod:`scanqueue.observe.metrics`,
without the queue depth when the database is unreachable.
"""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scanqueue.api.state import AppState, state_of
from scanqueue.config import mask_url
from scanqueue.db.engine import describe_db_error
from scanqueue.errors import ScanqueueError, UnavailableError

log = logging.getLogger(__name__)


def _check_health(state: AppState) -> dict[str, str]:
    settings = state.settings
    checks: dict[str, str] = {}
    try:
        state.store.ping()
        checks["database"] = "ok" if state.store.has_schema() else "no scans table (run upgrade)"
    except UnavailableError as exc:
        checks["database"] = str(exc)
    except Exception as exc:
        checks["database"] = f"error: {describe_db_error(exc)}"
    if settings.redis_url:
        try:
            state.redis().ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"cannot reach {mask_url(settings.redis_url)}: {exc}"
    broker = settings.broker_url
    if broker and broker != settings.redis_url:
        checks["broker"] = _check_broker(broker)
    return checks


def _check_broker(url: str) -> str:
    if url.startswith("sqla+"):
        return "ok"  # embedded beside the database: checked with it
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            from scanqueue.db.redisconn import redis_client

            client = redis_client(url)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu.connection import Connection

            with Connection(url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call,unused-ignore]
                conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"cannot reach {mask_url(url)}: {exc}"
    return "ok"


async def healthz(request: Request) -> Response:
    """Ok or not, per dependency, and nothing about hosts, URLs or errors.

    ``/healthz`` answers without the token (probes), so the reasons go to the
    log (URLs masked), never into the response.
    """
    state = state_of(request)
    details = await run_in_threadpool(_check_health, state)
    checks: dict[str, str] = {}
    for name, detail in details.items():
        if detail == "ok":
            checks[name] = "ok"
        else:
            checks[name] = "unavailable"
            log.warning("healthz: %s is not healthy: %s", name, detail)
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ok" if healthy else "unavailable",
            "checks": checks,
            "event_subscribers": state.subscribers,
        },
        status_code=200 if healthy else 503,
    )


def _render_metrics(state: AppState) -> tuple[bytes, str]:
    from scanqueue.observe import metrics as scanqueue_metrics

    try:
        return scanqueue_metrics.render_metrics(state.store)
    except ScanqueueError as exc:  # no queue depth without a database; the rest still
        log.warning("queue depth not exported: %s", exc)
        return scanqueue_metrics.render_metrics(None)


async def metrics(request: Request) -> Response:
    data, content_type = await run_in_threadpool(_render_metrics, state_of(request))
    return Response(data, headers={"Content-Type": content_type})
