"""Assembles a BridgeService wired to the Celery app (publish), and the broker-depth reader.

Kept apart from :mod:`scanqueue.bridge` so the bridge never imports Celery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .bridge import BridgeService, PublishError
from .config import Settings
from .observe import RunInfo
from .store import ReapedScan, store_for
from .watch import watcher_for
from .wiring import build_leadership

if TYPE_CHECKING:
    from .lineage import LineageObserver


def make_publisher(app: Any) -> Any:
    from .celery import QUEUE, TASK_NAME

    def publish(scan_ids: Sequence[str]) -> None:
        sent = 0
        batched = False
        try:
            with app.producer_or_acquire() as producer:
                # One round trip (Redis pipeline) or one commit (SQLite broker) for the
                # whole claim instead of one per message; other transports send at once.
                batched = callable(getattr(producer.channel, "create_publish_batch", None))
                with producer.batch(max_size=max(1, len(scan_ids))):
                    for scan_id in scan_ids:
                        # send_task: the publishing process need not import the task.
                        app.send_task(TASK_NAME, args=(scan_id,), producer=producer, queue=QUEUE)
                        sent += 1
        except Exception as exc:
            # A batch that failed may have been partly written: count none as sent, so
            # all are dispatched again (a duplicate message is harmless; a lost one is not).
            raise PublishError(0 if batched else sent, exc) from exc

    return publish


def make_broker_depth(app: Any) -> Any:
    from .celery import QUEUE

    def broker_depth() -> int | None:
        with app.connection_for_write() as conn:
            try:
                _, count, _ = conn.default_channel.queue_declare(queue=QUEUE, passive=True)
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
    from .events import emit_standalone

    lineage: LineageObserver | None = None
    if settings.lineage_enabled:
        from .lineage import LineageObserver

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


def build_bridge_service(settings: Settings, app: Any) -> BridgeService:
    store = store_for(settings.database_url)
    from .metrics import bridge_hooks

    hooks = bridge_hooks(store)  # store: scanqueue_scans{status}, unknown-status warnings
    hooks.lost_runs = _lost_run_events(settings)
    return BridgeService(
        store,
        make_publisher(app),
        build_leadership(settings, store),
        watcher_for(settings.database_url, settings.poll_every_s),
        batch=settings.dispatch_batch,
        lease_s=settings.lease_s,
        max_attempts=settings.max_attempts,
        reap_every_s=settings.reap_every_s,
        window=settings.dispatch_window or None,
        redispatch_after_s=settings.redispatch_after_s,
        hooks=hooks,
    )
