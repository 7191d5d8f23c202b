"""The no-op runner with parts of scanqueue switched off, to price each part.

For ``bench.ablation`` only: ``SCANQUEUE_RUNNER=bench.ablation_runners:noop`` with
``BENCH_ABLATE`` a comma list of ``events``, ``metrics``, ``lease``, ``wake`` (the
pool processes' start signal to the embedded bridge).  Importing
this module (which the pool process does when it builds its runtime, before it
builds the observers) replaces those parts with nothing.  Never for production:
events and metrics are part of the contract.
"""

from __future__ import annotations

import os

from scanqueue import Job, ScanContext
from scanqueue.config import Settings
from scanqueue.observe.observer import SafeObservers, ScanObserver
from scanqueue.worker import execute
from scanqueue.worker import runtime as wiring

ABLATED = {p.strip() for p in os.environ.get("BENCH_ABLATE", "").split(",") if p.strip()}


def _observer(settings: Settings) -> ScanObserver:
    from scanqueue.dispatch.wake import StartSignalObserver, installed_start_signal
    from scanqueue.observe.event_sender import EventObserver
    from scanqueue.observe.event_sinks import event_sink_for
    from scanqueue.observe.metrics import MetricsObserver

    observers: list[ScanObserver] = []
    if "wake" not in ABLATED and installed_start_signal() is not None:
        observers.append(StartSignalObserver())
    if "events" not in ABLATED:
        observers.append(EventObserver(event_sink_for(settings)))
    if "metrics" not in ABLATED:
        observers.append(MetricsObserver())
    return SafeObservers(observers)


class _NoLease:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


wiring.build_observer = _observer
if "lease" in ABLATED:
    execute.LeaseKeeper = _NoLease  # type: ignore[misc,assignment]


def noop(job: Job, ctx: ScanContext) -> None:
    return None
