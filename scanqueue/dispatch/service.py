"""Assembles a BridgeService wired to the Celery app (publish), and the broker-depth reader.

Kept apart from :mod:`scanqueue.dispatch.bridge` so the bridge never imports Celery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scanqueue.config import Settings
from scanqueue.db.rows import ReapedScan
from scanqueue.db.store import store_for
from scanqueue.dispatch.bridge import BridgeService
from scanqueue.dispatch.intake import derive_key, intake_events
from scanqueue.dispatch.leader import leadership_for
from scanqueue.dispatch.publish import make_publisher
from scanqueue.dispatch.wake import StartSignal
from scanqueue.dispatch.watch import watcher_for
from scanqueue.observe.observer import RunInfo

if TYPE_CHECKING:
    from scanqueue.observe.lineage import LineageObserver


def make_broker_depth(app: Any, queue: str | None = None) -> Any:
    queue = queue or app.conf.task_default_queue

    def broker_depth() -> int | None:
        with app.connection_for_write() as conn:
            try:
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
            except Exception as exc:
                # Redis deletes empty lists and AMQP has no such queue yet: both 404.
                if getattr(exc, "code", None) == 404 or "NOT_FOUND" in str(exc):
                    return 0
                raise
            return int(count)

    return broker_depth


def _lost_run_events(settings: Settings) -> Any:
    """Events for runs the reaper took back: ``scan.requeued`` or ``scan.failed``.

    With OpenLineage configured, also each run's terminal lineage event (the dead
    worker sent its ``START`` and nothing after).
    """
    from scanqueue.observe.event_sender import emit_standalone

    lineage: LineageObserver | None = None
    if settings.lineage_enabled:
        from scanqueue.observe.lineage import LineageObserver

        lineage = LineageObserver()

    def lost_runs(reaped: Sequence[ReapedScan]) -> None:
        for run in reaped:
            if lineage is not None:
                lineage.lost(RunInfo(run.scan_id, run.attempt, [], []), run.requeued)
            if run.requeued:
                emit_standalone(
                    settings,
                    "scan.requeued",
                    run.scan_id,
                    {"attempt": run.attempt, "reason": "worker lost"},
                )
            else:
                emit_standalone(
                    settings,
                    "scan.failed",
                    run.scan_id,
                    {"attempt": run.attempt, "error": "worker lost"},
                )

    return lost_runs


def _schedule_events(settings: Settings) -> Any:
    """``schedule.fired`` / ``schedule.skipped`` through the event sink (never raises)."""
    from scanqueue.observe.event_sender import emit_standalone

    def schedule_event(event_type: str, scan_id: str, payload: Mapping[str, Any]) -> None:
        emit_standalone(settings, event_type, scan_id, payload)

    return schedule_event


def _plug_leader_tasks(service: BridgeService, settings: Settings) -> None:
    """Webhooks (fan-out and delivery) and retention, on the leader's maintenance tick."""
    from scanqueue.dispatch.retention import Retention
    from scanqueue.dispatch.webhooks import WebhookDispatcher
    from scanqueue.observe.metrics import report_delivery, report_pruned

    webhooks = WebhookDispatcher(service.store, report=report_delivery)
    retention = Retention(
        service.store,
        days=settings.retain_days,
        per_key=settings.retain_per_key,
        report=lambda c: report_pruned(c.scans, c.findings, c.events),
    )
    service.leader_tasks.append(
        ("webhooks", _until_schema("webhooks", webhooks.run_once), webhooks.close)
    )
    service.leader_tasks.append(("retention", _until_schema("retention", retention.run_once), None))


SCHEMA_WARN_EVERY_S = 300.0


def _until_schema(name: str, step: Any) -> Any:
    """``step``, but a schema older than the code (a rolling deploy before ``db upgrade``)
    is one warning every few minutes, not a traceback every tick."""
    import logging
    import time

    from sqlalchemy import exc as sa_exc

    last_warned = -SCHEMA_WARN_EVERY_S

    def guarded() -> object:
        nonlocal last_warned
        problem: sa_exc.DBAPIError
        try:
            return step()
        except sa_exc.ProgrammingError as exc:  # PostgreSQL: relation/column does not exist
            problem = exc
        except sa_exc.OperationalError as exc:  # SQLite: no such table/column
            if "no such" not in str(exc):
                raise
            problem = exc
        now = time.monotonic()
        if now - last_warned >= SCHEMA_WARN_EVERY_S:
            last_warned = now
            logging.getLogger(__name__).warning(
                "leader %s skipped: the schema is older than this code (run `scanqueue db"
                " upgrade`): %s",
                name,
                str(getattr(problem, "orig", problem)).strip().splitlines()[0],
            )
        return None

    return guarded


def build_bridge_service(
    settings: Settings, app: Any, *, start_signal: StartSignal | None = None
) -> BridgeService:
    store = store_for(settings.database_url)
    from scanqueue.observe.metrics import bridge_hooks

    hooks = bridge_hooks(store)  # store: scanqueue_scans{status}, unknown-status warnings
    hooks.lost_runs = _lost_run_events(settings)
    hooks.schedule_event = _schedule_events(settings)
    service = BridgeService(
        store,
        make_publisher(app),
        leadership_for(settings, store),
        watcher_for(settings.database_url, settings.poll_every_s, start_signal),
        batch=settings.dispatch_batch,
        lease_s=settings.lease_s,
        max_attempts=settings.max_attempts,
        reap_every_s=settings.reap_every_s,
        window=settings.dispatch_window or None,
        redispatch_after_s=settings.redispatch_after_s,
        hooks=hooks,
        key_limit=settings.max_running_per_key,
        derive=derive_key,
        on_intake=intake_events(settings),
    )
    _plug_leader_tasks(service, settings)
    return service
