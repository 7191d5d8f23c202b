"""The worker bootstep that serves ``/metrics`` from the worker's main process.

Lives in the worker blueprint (so it runs once per worker, whether or not the
embedded bridge does, and survives broker reconnects).  Its constructor runs
before the Pool step forks any process, which is the one moment to put the
worker into prometheus_client's multiprocess mode
(:func:`scanqueue.observe.metrics_multiprocess.prepare_multiprocess_dir`); so this
module must not import prometheus_client at import time.  Once the pool runs it serves the
aggregate of every process on ``SCANQUEUE_METRICS_PORT`` and reports the pool's
size every second.  Off (no directory, no server) when the port is 0.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from scanqueue.errors import ConfigError

log = logging.getLogger(__name__)

POOL_REPORT_EVERY_S = 1.0


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Multiprocess metrics directory, ``/metrics`` server and pool-size gauge."""

    label = "scanqueue metrics"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        from scanqueue.worker.app import settings

        self.port = settings.metrics_port
        self.enabled = bool(self.port)
        self.server: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.enabled:
            from scanqueue.observe.metrics_multiprocess import prepare_multiprocess_dir

            self.directory = prepare_multiprocess_dir()

    def start(self, worker: Any) -> None:
        from scanqueue.observe.metrics import serve_metrics

        try:
            self.server = serve_metrics(self.port)
        except ConfigError as exc:
            log.critical("scanqueue: %s", exc)
            raise SystemExit(1) from None
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._report_loop, args=(worker,), name="scanqueue-metrics-pool", daemon=True
        )
        self._thread.start()

    def _report_loop(self, worker: Any) -> None:
        while True:
            try:
                self.report_once(worker)
            except Exception:
                log.exception("metrics: reporting the pool size failed; carrying on")
            if self._stop.wait(POOL_REPORT_EVERY_S):
                return

    @staticmethod
    def report_once(worker: Any) -> None:
        from celery.worker import state

        from scanqueue.observe.metrics import report_pool
        from scanqueue.observe.metrics_multiprocess import maybe_compact_multiprocess_dir

        pool = getattr(worker, "pool", None)
        processes = int(getattr(pool, "num_processes", 0) or 0) if pool is not None else 0
        report_pool(processes, len(state.active_requests))
        # Autoscale churn leaves files of ended pool processes: fold them in now and
        # then, also when nobody scrapes.
        maybe_compact_multiprocess_dir()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
