"""Prometheus metrics: every metric scanqueue exports, defined once, and how they are served.

Owns the metric definitions (fixed label sets; never a scan id, token or other
unbounded value as a label), the observer that records runs, the bridge's
hooks, and the HTTP endpoint.  A prefork worker serves the aggregate of its
processes' values; the directory they share (preparing it, dead processes,
compaction) is :mod:`scanqueue.observe.metrics_multiprocess`.

Which process exports what:

==========================================  ======================================
``scanqueue_scans_*``, durations, latency   processes that run scans (pool processes)
``scanqueue_queue_depth``                   processes that run a bridge, and ``serve``
``scanqueue_scans{status}`` (rows)          processes that run a bridge, and ``serve``
``scanqueue_oldest_queued_age_seconds``     processes that run a bridge, and ``serve``
``scanqueue_http_*`` (requests, durations)  ``serve``
``scanqueue_bridge_leader``, dispatch/reap  processes that run a bridge
``scanqueue_worker_*``                      a worker's main process
==========================================  ======================================

The bridge and pool groups are created on first use, so a worker started with
``--without-bridge`` exports no queue depth of ``0`` that would read as fact.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from scanqueue.errors import ConfigError
from scanqueue.observe.hooks import BridgeHooks
from scanqueue.observe.metrics_multiprocess import aggregate_registry, multiprocess_dir

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from scanqueue.db.rows import FinishedRun
    from scanqueue.db.store import Store
    from scanqueue.observe.observer import RunInfo

log = logging.getLogger(__name__)

# All interfaces by default: Prometheus scrapes from another container or host, and
# nothing here is secret.  SCANQUEUE_METRICS_ADDR=127.0.0.1 keeps it on the host.
METRICS_ADDR_ENV = "SCANQUEUE_METRICS_ADDR"
DEFAULT_METRICS_ADDR = "0.0.0.0"  # noqa: S104 - see above

FINISHED_STATUSES = ("completed", "failed", "canceled", "discarded")
REAP_OUTCOMES = ("requeued", "failed")
# Scans take seconds to hours; pickup is usually sub-second but a backlog stretches it.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, float("inf"))
PICKUP_BUCKETS_S = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
    float("inf"),
)

# A fork while another thread of the main process is inside a metric write would
# leave prometheus_client's per-process lock held in the child for ever (the pool
# forks at every autoscale grow while the bridge thread writes gauges).  Main-process
# writes take this lock, and fork waits for it.
_fork_lock = threading.Lock()
os.register_at_fork(
    before=_fork_lock.acquire,
    after_in_parent=_fork_lock.release,
    after_in_child=_fork_lock.release,
)


@contextmanager
def _writing() -> Iterator[None]:
    with _fork_lock:
        yield


# -- the metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanMetrics:
    started: Counter
    finished: Counter
    duration: Histogram
    pickup_latency: Histogram
    retries: Counter
    timeouts: Counter


@dataclass(frozen=True)
class BridgeMetrics:
    queue_depth: Gauge
    leader: Gauge
    dispatched: Counter
    reaped: Counter


@dataclass(frozen=True)
class PoolMetrics:
    processes: Gauge
    active: Gauge


@cache
def scan_metrics() -> ScanMetrics:
    from prometheus_client import Counter, Histogram

    finished = Counter(
        "scanqueue_scans_finished",
        "Runs that ended, by outcome (canceled: the scan was canceled while it ran; "
        "discarded: the run was stopped or lost its lease, and the scan runs again).",
        ["status"],
    )
    for status in FINISHED_STATUSES:
        finished.labels(status)
    return ScanMetrics(
        started=Counter("scanqueue_scans_started", "Runs started (attempts included)."),
        finished=finished,
        duration=Histogram(
            "scanqueue_scan_duration_seconds",
            "Wall time of a run, from start to its recorded outcome.",
            buckets=DURATION_BUCKETS_S,
        ),
        pickup_latency=Histogram(
            "scanqueue_pickup_latency_seconds",
            "From a scan's created_at to the start of its run.",
            buckets=PICKUP_BUCKETS_S,
        ),
        retries=Counter("scanqueue_retries", "Failed runs put back to queued for a retry."),
        timeouts=Counter("scanqueue_timeouts", "Runs stopped because they ran past their timeout."),
    )


@cache
def queue_depth_gauge() -> Gauge:
    # Apart from the bridge group: a web process exports the depth, but no leader flag.
    from prometheus_client import Gauge

    return Gauge(
        "scanqueue_queue_depth",
        "Scans with status 'queued', as this process last counted them.",
        multiprocess_mode="livemax",
    )


@cache
def scans_gauge() -> Gauge:
    """``scanqueue_scans{status}``: rows per status; values scanqueue does not know
    (another program wrote ``QUEUED``) are summed under ``status="unknown"``."""
    from prometheus_client import Gauge

    return Gauge(
        "scanqueue_scans",
        "Rows of scans per status, as this process last counted them ('unknown': a status "
        "scanqueue does not know, which nothing will pick up).",
        ["status"],
        multiprocess_mode="livemax",
    )


@cache
def oldest_queued_gauge() -> Gauge:
    """``scanqueue_oldest_queued_age_seconds``: how long the oldest queued scan has waited."""
    from prometheus_client import Gauge

    return Gauge(
        "scanqueue_oldest_queued_age_seconds",
        "Seconds since the oldest scan with status 'queued' was created (0: none queued).",
        multiprocess_mode="livemax",
    )


def report_oldest_queued(store: Store) -> None:
    """Set ``scanqueue_oldest_queued_age_seconds`` from the store (one indexed MIN)."""
    age = store.oldest_queued_age_s()
    with _writing():
        oldest_queued_gauge().set(age)


# Request metrics of ``scanqueue serve``: labelled by route *template* (never a scan
# id) and method; unmatched paths are counted under route "(unmatched)".
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


@dataclass(frozen=True)
class HttpMetrics:
    requests: Counter
    duration: Histogram


@cache
def http_metrics() -> HttpMetrics:
    from prometheus_client import Counter, Histogram

    return HttpMetrics(
        requests=Counter(
            "scanqueue_http_requests",
            "HTTP requests served, by route template, method and status code.",
            ["route", "method", "status"],
        ),
        duration=Histogram(
            "scanqueue_http_request_duration_seconds",
            "Time to the response's first byte, by route template and method.",
            ["route", "method"],
            buckets=HTTP_BUCKETS_S,
        ),
    )


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    m = http_metrics()
    with _writing():
        m.requests.labels(route, method, str(status)).inc()
        m.duration.labels(route, method).observe(seconds)


def report_scan_statuses(counts: dict[str, int]) -> dict[str, int]:
    """Set ``scanqueue_scans{status}`` from :meth:`Store.count_by_status`; returns the
    per-label values (known statuses, then ``unknown``)."""
    from scanqueue.db.schema import STATUSES

    labelled = {status: counts.get(status, 0) for status in STATUSES}
    labelled["unknown"] = sum(n for status, n in counts.items() if status not in STATUSES)
    gauge = scans_gauge()
    with _writing():
        for status, n in labelled.items():
            gauge.labels(status).set(n)
    return labelled


class UnknownStatusWatch:
    """Counts rows per status now and then, and warns once per row of an unknown status.

    Run from the bridge's maintenance tick (every bridge, like the queue depth), at
    most every ``every_s`` seconds: a ``GROUP BY status`` over the whole table is
    cheap, but not something to do several times a second.
    """

    MAX_REMEMBERED = 10_000  # ids already warned about; bounded, then forgotten

    def __init__(self, store: Store, every_s: float = 10.0) -> None:
        self.store = store
        self.every_s = every_s
        self._last = -float("inf")
        self._warned: set[str] = set()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        try:
            report_oldest_queued(self.store)
            labelled = report_scan_statuses(self.store.count_by_status())
            if not labelled["unknown"]:
                return
            rows = self.store.rows_with_unknown_status(limit=100)
        except Exception as exc:  # metrics never take the bridge down
            log.debug("could not count scans per status: %s", exc)
            return
        if len(self._warned) > self.MAX_REMEMBERED:
            self._warned.clear()
        for scan_id, status in rows:
            if scan_id in self._warned:
                continue
            self._warned.add(scan_id)
            log.warning(
                "scan %s has status %r, which scanqueue does not know (expected one of "
                "queued, running, completed, failed, canceled): nothing will run it",
                scan_id,
                status,
            )


@cache
def bridge_metrics() -> BridgeMetrics:
    from prometheus_client import Counter, Gauge

    reaped = Counter(
        "scanqueue_scans_reaped",
        "Runs found orphaned (no heartbeat) by the leader, by what became of the scan.",
        ["outcome"],
    )
    for outcome in REAP_OUTCOMES:
        reaped.labels(outcome)
    return BridgeMetrics(
        queue_depth=queue_depth_gauge(),
        leader=Gauge(
            "scanqueue_bridge_leader",
            "1 while this bridge holds the leader lock, else 0.",
            multiprocess_mode="livemax",
        ),
        dispatched=dispatched_counter(),
        reaped=reaped,
    )


@cache
def dispatched_counter() -> Counter:
    """Bridges count their claims' messages; pool processes their starts' successors'."""
    from prometheus_client import Counter

    return Counter("scanqueue_scans_dispatched", "Scans published to the broker.")


def report_dispatched(count: int) -> None:
    with _writing():
        dispatched_counter().inc(count)


@cache
def pool_metrics() -> PoolMetrics:
    from prometheus_client import Gauge

    return PoolMetrics(
        processes=Gauge(
            "scanqueue_worker_pool_processes",
            "Pool processes this worker currently runs (moves with autoscale).",
            multiprocess_mode="livemax",
        ),
        active=Gauge(
            "scanqueue_worker_active_scans",
            "Scans this worker's pool processes are running now.",
            multiprocess_mode="livemax",
        ),
    )


PRUNED_WHAT = ("scans", "findings", "events")
DELIVERY_OUTCOMES = ("delivered", "retry", "given_up")


@cache
def pruned_counter() -> Counter:
    """``scanqueue_pruned_total{what}``: rows retention deleted (leader and ``prune``)."""
    from prometheus_client import Counter

    counter = Counter(
        "scanqueue_pruned",
        "Rows deleted by retention (SCANQUEUE_RETAIN_DAYS, scanqueue prune), by table.",
        ["what"],
    )
    for what in PRUNED_WHAT:
        counter.labels(what)
    return counter


def report_pruned(scans: int, findings: int, events: int) -> None:
    counter = pruned_counter()
    with _writing():
        for what, n in (("scans", scans), ("findings", findings), ("events", events)):
            if n:
                counter.labels(what).inc(n)


@cache
def webhook_deliveries_counter() -> Counter:
    """``scanqueue_webhook_deliveries_total{outcome}``: webhook POSTs tried by the leader."""
    from prometheus_client import Counter

    counter = Counter(
        "scanqueue_webhook_deliveries",
        "Webhook deliveries tried, by outcome (retry: failed, tried again later; "
        "given_up: failed its last attempt).",
        ["outcome"],
    )
    for outcome in DELIVERY_OUTCOMES:
        counter.labels(outcome)
    return counter


def report_delivery(outcome: str) -> None:
    if outcome in DELIVERY_OUTCOMES:
        with _writing():
            webhook_deliveries_counter().labels(outcome).inc()


# -- recording ----------------------------------------------------------------------------


def _finished_label(status: str) -> str:
    return status if status in FINISHED_STATUSES else "failed"


class MetricsObserver:
    """A ScanObserver that counts runs; used in the processes that run scans."""

    def __init__(self) -> None:
        self.metrics = scan_metrics()

    def started(self, run: RunInfo) -> None:
        with _writing():
            self.metrics.started.inc()
            latency = run.pickup_latency_s
            if latency is not None:
                self.metrics.pickup_latency.observe(latency)

    def event(self, run: RunInfo, event_type: str, payload: dict[str, object]) -> None:
        if event_type == "scan.retrying":
            with _writing():
                self.metrics.retries.inc()
        elif event_type == "scan.timed_out":
            with _writing():
                self.metrics.timeouts.inc()

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        with _writing():
            self.metrics.finished.labels(_finished_label(row.status)).inc()
            self.metrics.duration.observe(duration_s)

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        with _writing():
            self.metrics.finished.labels("discarded").inc()
            self.metrics.duration.observe(duration_s)

    def canceled(self, run: RunInfo, duration_s: float) -> None:
        with _writing():
            self.metrics.finished.labels("canceled").inc()
            self.metrics.duration.observe(duration_s)


def bridge_hooks(store: Store | None = None) -> BridgeHooks:
    """Hooks through which a bridge reports depth, leadership, dispatches and reaps.

    With a ``store`` the depth hook also keeps ``scanqueue_scans{status}`` and warns
    about rows of unknown status (:class:`UnknownStatusWatch`).
    """
    m = bridge_metrics()
    watch = UnknownStatusWatch(store) if store is not None else None

    def queue_depth(depth: int) -> None:
        with _writing():
            m.queue_depth.set(depth)
        if watch is not None:
            watch.tick()

    def leader(is_leader: bool) -> None:
        with _writing():
            m.leader.set(1 if is_leader else 0)

    def dispatched(count: int) -> None:
        with _writing():
            m.dispatched.inc(count)

    def reaped(requeued: int, failed: int) -> None:
        with _writing():
            if requeued:
                m.reaped.labels("requeued").inc(requeued)
            if failed:
                m.reaped.labels("failed").inc(failed)

    with _writing():
        m.leader.set(0)
    return BridgeHooks(queue_depth=queue_depth, leader=leader, dispatched=dispatched, reaped=reaped)


def report_pool(processes: int, active: int) -> None:
    m = pool_metrics()
    with _writing():
        m.processes.set(processes)
        m.active.set(active)


# -- exposition ---------------------------------------------------------------------------


def registry() -> CollectorRegistry:
    """What to expose: every process's files in multiprocess mode, else this process."""
    from prometheus_client import REGISTRY

    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    return aggregate_registry(path)


DEPTH_MAX_AGE_S = 1.0  # a scrape reuses a queue-depth count this recent


def render_metrics(store: Store | None = None) -> tuple[bytes, str]:
    """The text exposition and its content type, for a web process's ``GET /metrics``.

    With a ``store`` the queue depth is counted first, so a web process that runs no
    bridge still exports it.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if store is not None:
        # Shared per interval with the bridge and the autoscaler in this process.
        depth = store.queue_depth(max_age_s=DEPTH_MAX_AGE_S)
        with _writing():
            queue_depth_gauge().set(depth)
        report_scan_statuses(store.count_by_status())
        report_oldest_queued(store)
    return generate_latest(registry()), CONTENT_TYPE_LATEST


def metrics_addr() -> str:
    return os.environ.get(METRICS_ADDR_ENV, "").strip() or DEFAULT_METRICS_ADDR


def serve_metrics(port: int, addr: str | None = None) -> WSGIServer:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server.

    Raises ConfigError (naming SCANQUEUE_METRICS_PORT) when the port cannot be bound.
    """
    from prometheus_client import start_http_server

    host = addr or metrics_addr()
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry())
    except OSError as exc:
        raise ConfigError(
            "SCANQUEUE_METRICS_PORT", f"cannot serve metrics on {host}:{port}: {exc.strerror}"
        ) from None
    log.info(
        "metrics on http://%s:%d/metrics%s",
        host,
        port,
        " (multiprocess)" if multiprocess_dir() else "",
    )
    return server
