"""Worker bootsteps: wait for the services, register the worker, run the embedded bridge.

All live in the worker *blueprint* (not the consumer's, which restarts on
every broker reconnect) and so run in the worker's main process.  Start order:
readiness (database reachable and migrated, broker reachable — retried with
backoff for ``SCANQUEUE_CONNECT_TIMEOUT``, then exit 1), then the worker's
registration, then the bridge.  On shutdown the bridge stops and releases
leadership before the pool drains; the registration is removed.

The registration (a ``scanqueue_workers`` row: id, host, pid, slots — the
autoscale maximum, else the concurrency — and a heartbeat refreshed every
``WORKER_HEARTBEAT_EVERY_S`` by a thread of the main process) is what every
bridge sizes its default dispatch window from, and what ``scanqueue queue`` and
the console show.  A worker that died without removing it stops counting once
its heartbeat is ``WORKER_STALE_AFTER_S`` old.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import bootsteps

from scanqueue.db.engine import retry_with_backoff
from scanqueue.db.store import store_for
from scanqueue.errors import ScanqueueError, UnavailableError

log = logging.getLogger(__name__)


def _exit(message: str) -> None:
    log.critical("%s", message)
    raise SystemExit(1)


class ReadinessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Wait (bounded) for the database, its schema and the broker before consuming."""

    label = "scanqueue readiness"
    requires = ("celery.worker.components:Hub",)

    def start(self, worker: Any) -> None:
        from scanqueue.worker.app import app, settings

        store = store_for(settings.database_url)

        def broker_ready() -> None:
            from scanqueue.config import mask_url

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


class RegistryStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """This worker's row in ``scanqueue_workers``, kept fresh while it runs."""

    label = "scanqueue worker registry"
    requires = ("celery.worker.components:Pool", "scanqueue.worker.steps:ReadinessStep")

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.worker_id: str | None = None

    @staticmethod
    def slots_of(worker: Any) -> int:
        """Scans this worker can run at once: the autoscale maximum, else the pool size."""
        return int(getattr(worker, "max_concurrency", None) or worker.concurrency or 1)

    def start(self, worker: Any) -> None:
        from scanqueue.dispatch.bridge import WORKER_HEARTBEAT_EVERY_S
        from scanqueue.identity import worker_identity
        from scanqueue.worker.app import settings

        store = store_for(settings.database_url)
        worker_id = self.worker_id = worker_identity()
        slots = self.slots_of(worker)
        hostname = socket.gethostname()
        pid = os.getpid()

        def register() -> None:
            store.register_worker(worker_id, hostname, pid, slots)

        try:
            register()
        except ScanqueueError as exc:  # the refresher below retries
            log.warning("cannot register this worker yet: %s", exc)
        log.info("worker %s registered with %d slot(s)", worker_id, slots)

        def refresh() -> None:
            while not self._stop.wait(WORKER_HEARTBEAT_EVERY_S):
                try:
                    register()  # an upsert: also restores a row deleted meanwhile
                except Exception as exc:
                    log.warning("cannot refresh this worker's registration: %s", exc)

        self._thread = threading.Thread(
            target=refresh, name="scanqueue-worker-registry", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.worker_id is not None:
            from scanqueue.worker.app import settings

            try:
                store_for(settings.database_url).unregister_worker(self.worker_id)
            except ScanqueueError as exc:
                log.warning("cannot remove this worker's registration (it goes stale): %s", exc)
            self.worker_id = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)


class BridgeStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The embedded bridge (``--without-bridge`` turns it off)."""

    label = "scanqueue bridge"
    requires = ("celery.worker.components:Pool", "scanqueue.worker.steps:RegistryStep")

    def __init__(self, worker: Any, without_bridge: bool = False, **kwargs: Any) -> None:
        self.enabled = not without_bridge
        self.service: Any = None
        self.start_signal: Any = None
        if self.enabled:
            from scanqueue.dispatch.wake import install_start_signal

            # Before the pool forks, so that every pool process inherits the pipe.
            self.start_signal = install_start_signal()

    def start(self, worker: Any) -> None:
        from scanqueue.dispatch.service import build_bridge_service
        from scanqueue.worker.app import app, settings

        self.service = build_bridge_service(settings, app, start_signal=self.start_signal)
        self.service.start()
        log.info("embedded bridge started (%s)", self.service.leadership.identity)

    def stop(self, worker: Any) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
