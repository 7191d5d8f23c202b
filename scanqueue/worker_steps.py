"""Worker bootsteps: wait for the services at start, and run the embedded bridge.

Both live in the worker *blueprint* (not the consumer's, which restarts on
every broker reconnect) and so run in the worker's main process.  Start order:
readiness (database reachable and migrated, broker reachable — retried with
backoff for ``SCANQUEUE_CONNECT_TIMEOUT``, then exit 1), then the bridge.
On shutdown the bridge stops and releases leadership before the pool drains.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from .errors import ScanqueueError, UnavailableError
from .store import retry_with_backoff, store_for

log = logging.getLogger(__name__)


def _exit(message: str) -> None:
    log.critical("%s", message)
    raise SystemExit(1)


class ReadinessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Wait (bounded) for the database, its schema and the broker before consuming."""

    label = "scanqueue readiness"
    requires = ("celery.worker.components:Hub",)

    def start(self, worker: Any) -> None:
        from .celery import app, settings

        store = store_for(settings.database_url)

        def broker_ready() -> None:
            from .config import mask_url

            try:
                with app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=5)
            except Exception as exc:
                raise UnavailableError(
                    f"cannot reach broker {mask_url(settings.broker_url)}: {exc}"
                ) from None

        try:
            store.wait_until_ready(settings.connect_timeout_s)
            retry_with_backoff(
                broker_ready, timeout_s=settings.connect_timeout_s, what="the broker"
            )
        except ScanqueueError as exc:
            message = str(exc)
            if not message.startswith("giving up"):
                message = f"giving up after {settings.connect_timeout_s:g}s: {message}"
            _exit(message)

    def stop(self, worker: Any) -> None:
        pass


class BridgeStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The embedded bridge (``--without-bridge`` turns it off)."""

    label = "scanqueue bridge"
    requires = ("celery.worker.components:Pool", "scanqueue.worker_steps:ReadinessStep")

    def __init__(self, worker: Any, without_bridge: bool = False, **kwargs: Any) -> None:
        self.enabled = not without_bridge
        self.service: Any = None

    def start(self, worker: Any) -> None:
        from .celery import app, settings
        from .service import build_bridge_service

        self.service = build_bridge_service(settings, app)
        self.service.start()
        log.info("embedded bridge started (%s)", self.service.leadership.identity)

    def stop(self, worker: Any) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
