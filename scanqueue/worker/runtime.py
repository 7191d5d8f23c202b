"""Builds the long-lived pieces from Settings, once per process.

The worker's pool processes, the embedded bridge, ``scanqueue bridge`` and
``scanqueue serve`` all assemble the same parts (store, runner, observers,
leadership, watcher); this module is where that assembly lives, so each entry
point stays a few lines.  Everything is cached per process id, because the
prefork pool forks after start.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scanqueue.config import Settings
from scanqueue.db.store import Store, store_for
from scanqueue.dispatch.wake import StartSignalObserver, installed_start_signal
from scanqueue.errors import UnavailableError
from scanqueue.observe.observer import SafeObservers, ScanObserver
from scanqueue.runners.api import Runner, load_runner
from scanqueue.worker.execute import ExecutionSettings
from scanqueue.worker.successor import Successors, successors_for


@dataclass(frozen=True)
class WorkerRuntime:
    store: Store
    runner: Runner
    observer: ScanObserver
    execution: ExecutionSettings
    successors: Successors | None = None


_runtime: tuple[int, WorkerRuntime] | None = None
_runtime_lock = threading.Lock()


def worker_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime for running scans (rebuilt after a fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime[0] != os.getpid():
            store = store_for(settings.database_url)
            _runtime = (
                os.getpid(),
                WorkerRuntime(
                    store=store,
                    runner=load_runner(settings.runner),
                    observer=build_observer(settings),
                    execution=ExecutionSettings(
                        heartbeat_every_s=settings.heartbeat_every_s,
                        lease_s=settings.lease_s,
                        cancel_grace_s=settings.cancel_grace_s,
                        max_retries=settings.max_retries,
                        retry_backoff_s=settings.retry_backoff_s,
                        scan_timeout_s=settings.scan_timeout_s,
                    ),
                    successors=successors_for(settings, store),
                ),
            )
        return _runtime[1]


def build_observer(settings: Settings) -> ScanObserver:
    """Events, metrics and, when configured, lineage observers for this process."""
    from scanqueue.observe.event_sender import EventObserver
    from scanqueue.observe.event_sinks import event_sink_for
    from scanqueue.observe.metrics import MetricsObserver

    observers: list[ScanObserver] = [EventObserver(event_sink_for(settings)), MetricsObserver()]
    if installed_start_signal() is not None:
        # First: the embedded bridge refills its dispatch window at once.
        observers.insert(0, StartSignalObserver())
    if settings.lineage_enabled:
        # Imported only when used: the OpenLineage client costs ~0.35 s to import.
        from scanqueue.observe.lineage import LineageObserver

        observers.append(LineageObserver())
    return SafeObservers(observers)


def wait_for_services(settings: Settings, app: Any) -> None:
    """Before a long-running process starts: the database, Redis and the broker, bounded.

    Each is retried with backoff, every attempt logged, for up to
    ``SCANQUEUE_CONNECT_TIMEOUT`` seconds; then UnavailableError says which one and
    why, in one line.  Only the start is bounded: once running, the bridge rides out
    an outage (the leader lock and the publisher reconnect for as long as it takes).
    """
    from scanqueue.config import mask_url
    from scanqueue.db.engine import retry_with_backoff

    timeout_s = settings.connect_timeout_s
    deadline = time.monotonic() + timeout_s  # one budget for all of them
    store_for(settings.database_url).wait_until_ready(timeout_s)

    def redis_ready() -> None:
        from scanqueue.db.redisconn import redis_client

        assert settings.redis_url is not None
        client = redis_client(settings.redis_url)
        try:
            client.ping()
        except Exception as exc:
            raise UnavailableError(
                f"cannot reach REDIS_URL {mask_url(settings.redis_url)}: {exc}"
            ) from None
        finally:
            client.close()

    def broker_ready() -> None:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            raise UnavailableError(
                f"cannot reach broker {mask_url(settings.broker_url)}: {exc}"
            ) from None

    checks: list[tuple[str, Callable[[], None]]] = []
    if settings.redis_url:
        checks.append(("Redis", redis_ready))
    if settings.broker_url != settings.redis_url:
        checks.append(("the broker", broker_ready))
    for what, check in checks:
        try:
            remaining = max(deadline - time.monotonic(), 0.0)
            retry_with_backoff(check, timeout_s=remaining, what=what)
        except UnavailableError as exc:
            raise UnavailableError(f"giving up after {timeout_s:g}s: {exc}") from None
