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
from dataclasses import dataclass

from .config import Settings
from .execute import ExecutionSettings, worker_identity
from .leader import Leadership, LeaseLeadership, RedisLeadership
from .observe import SafeObservers, ScanObserver
from .runner import Runner, load_runner
from .store import Store, store_for


@dataclass(frozen=True)
class WorkerRuntime:
    store: Store
    runner: Runner
    observer: ScanObserver
    execution: ExecutionSettings


_runtime: tuple[int, WorkerRuntime] | None = None
_runtime_lock = threading.Lock()


def worker_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime for running scans (rebuilt after a fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime[0] != os.getpid():
            _runtime = (
                os.getpid(),
                WorkerRuntime(
                    store=store_for(settings.database_url),
                    runner=load_runner(settings.runner),
                    observer=build_observer(settings),
                    execution=ExecutionSettings(
                        heartbeat_every_s=settings.heartbeat_every_s,
                        lease_s=settings.lease_s,
                        cancel_grace_s=settings.cancel_grace_s,
                    ),
                ),
            )
        return _runtime[1]


def build_observer(settings: Settings) -> ScanObserver:
    """Events, metrics and, when configured, lineage observers for this process."""
    from .events import EventObserver, event_sink_for
    from .metrics import MetricsObserver

    observers: list[ScanObserver] = [EventObserver(event_sink_for(settings)), MetricsObserver()]
    if settings.lineage_enabled:
        # Imported only when used: the OpenLineage client costs ~0.35 s to import.
        from .lineage import LineageObserver

        observers.append(LineageObserver())
    return SafeObservers(observers)


def build_leadership(settings: Settings, store: Store) -> Leadership:
    identity = worker_identity()
    if settings.redis_url:
        from .redisconn import redis_client

        return RedisLeadership(
            redis_client(settings.redis_url),
            identity,
            ttl_s=settings.leader_ttl_s,
            name=f"scanqueue:{settings.queue}:leader",
        )
    return LeaseLeadership(
        store, identity, ttl_s=settings.leader_ttl_s, name=f"bridge:{settings.queue}"
    )
