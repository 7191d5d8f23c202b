"""Prometheus metrics: every metric scanqueue exports, defined once, and how they are served.

Owns the metric definitions (fixed label sets; never a scan id, token or other
unbounded value as a label), the observer that records runs, the bridge's
hooks, the multiprocess directory of a prefork worker, and the HTTP endpoint.

Under Celery's prefork pool the scans run in pool processes while ``/metrics``
is served by the worker's main process, so a worker uses prometheus_client's
multiprocess mode: every process writes its values to mmap files in
``PROMETHEUS_MULTIPROC_DIR`` and the main process serves their aggregate
through a ``MultiProcessCollector``.  prometheus_client picks the mode when a
metric value is created, so the directory must be in the environment before
the first metric exists in the main process and before the pool forks —
:func:`prepare_multiprocess_dir` (called by the worker bootstep's constructor)
does that.  Gauges that only the main process sets use ``livemax``: forked
children write ``0`` for every metric they inherit, and ``max`` over live
processes ignores those (``mark_process_dead`` removes a child's gauge files).

Which process exports what:

==========================================  ======================================
``scanqueue_scans_*``, durations, latency   processes that run scans (pool processes)
``scanqueue_queue_depth``                   processes that run a bridge, and ``serve``
``scanqueue_scans{status}`` (rows)          processes that run a bridge, and ``serve``
``scanqueue_bridge_leader``, dispatch/reap  processes that run a bridge
``scanqueue_worker_*``                      a worker's main process
==========================================  ======================================

The bridge and pool groups are created on first use, so a worker started with
``--without-bridge`` exports no queue depth of ``0`` that would read as fact.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from scanqueue.errors import ConfigError
from scanqueue.observe.hooks import BridgeHooks

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.multiprocess import MultiProcessCollector

    from scanqueue.db.store import ScanRow, Store
    from scanqueue.observe.observer import RunInfo

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
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


# -- the multiprocess directory -----------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multiprocess directory in effect for this process, if any."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir() -> str:
    """Put this process (and the pool it will fork) in multiprocess mode; return the dir.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` when the deployment sets it (its ``*.db`` files
    from a previous run are removed: they would add a dead worker's counts), else a
    fresh temporary directory removed when this process exits.
    """
    given = multiprocess_dir()
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="scanqueue-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
        _remove_at_exit(path, os.getpid())
    _use_multiprocess_values()
    return str(path)


def _remove_at_exit(path: Path, owner_pid: int) -> None:
    import atexit

    def remove() -> None:
        if os.getpid() == owner_pid:  # not in a forked child that happens to run atexit
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)


def _use_multiprocess_values() -> None:
    # prometheus_client chose its value class when it was first imported; if that
    # happened before the directory was set, choose again (only metrics created after
    # this call are affected, hence the lazily created groups below).
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int) -> None:
    """A pool process ended: drop its live gauges (counters stay: they are history)."""
    path = multiprocess_dir()
    if path is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# Files of dead processes are folded into one archive file per kind, so that autoscale
# churn (a pool process forked and ended again and again) leaves a directory whose size
# follows the live processes, not the uptime.  Totals are kept: counters, histograms and
# summaries are summed, gauges combined by their mode (a dead process's "all" series
# ends with it; "live*" files are already gone).  Compaction and the collector take
# this lock, so a scrape in this process never meets a file being folded away.
COMPACT_EVERY_S = 10.0
_compact_lock = threading.Lock()
_last_compact = [-float("inf")]
_ARCHIVE = "archive"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def compact_multiprocess_dir(path: str | None = None) -> int:
    """Fold the files of dead processes into the archive files; returns how many went.

    Safe to call at any time from the process that serves ``/metrics``.  A pid that
    was reused keeps its old files until that process ends too.
    """
    path = path or multiprocess_dir()
    if path is None:
        return 0
    from time import monotonic  # (not at the top: the shared import block stays untouched)

    with _compact_lock:
        _last_compact[0] = monotonic()
        return _compact(Path(path))


def _compact(directory: Path) -> int:
    from prometheus_client.mmap_dict import MmapedDict

    groups: dict[str, list[Path]] = {}
    drop: list[Path] = []
    for f in directory.glob("*.db"):
        parts = f.name[:-3].split("_")
        if len(parts) < 2 or not parts[-1].isdigit() or _pid_alive(int(parts[-1])):
            continue
        prefix = "_".join(parts[:-1])  # "counter", "histogram", "gauge_max", …
        if prefix.startswith("gauge_live") or prefix == "gauge_all":
            drop.append(f)  # the series of a dead process ends with it
        else:
            groups.setdefault(prefix, []).append(f)
    for prefix, files in groups.items():
        archive = directory / f"{prefix}_{_ARCHIVE}.db"
        combined: dict[str, tuple[float, float]] = {}
        for source in ([archive] if archive.exists() else []) + files:
            for key, value, stamp, _ in MmapedDict.read_all_values_from_file(str(source)):  # type: ignore[no-untyped-call]
                combined[key] = _combine(prefix, combined.get(key), (value, stamp))
        # Write the archive first, then remove the sources: a crash in between counts
        # a dead process twice until restart, rather than losing it.
        archive_dict = MmapedDict(str(archive))  # type: ignore[no-untyped-call]
        try:
            for key, (value, stamp) in combined.items():
                archive_dict.write_value(key, value, stamp)  # type: ignore[no-untyped-call]
        finally:
            archive_dict.close()  # type: ignore[no-untyped-call]
        drop.extend(files)
    for f in drop:
        f.unlink(missing_ok=True)
    return len(drop)


def _combine(
    prefix: str, old: tuple[float, float] | None, new: tuple[float, float]
) -> tuple[float, float]:
    if old is None:
        return new
    if prefix == "gauge_max":
        return max(old, new)
    if prefix == "gauge_min":
        return min(old, new)
    if prefix == "gauge_mostrecent":
        return new if new[1] >= old[1] else old
    return (old[0] + new[0], max(old[1], new[1]))  # counters, histograms, summaries, sums


def maybe_compact_multiprocess_dir(every_s: float = COMPACT_EVERY_S) -> None:
    """:func:`compact_multiprocess_dir` at most every ``every_s`` seconds (never raises)."""
    from time import monotonic

    if multiprocess_dir() is None or monotonic() - _last_compact[0] < every_s:
        return
    try:
        compact_multiprocess_dir()
    except Exception:
        log.exception("metrics: compacting the multiprocess directory failed; carrying on")


# -- the metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanMetrics:
    started: Counter
    finished: Counter
    duration: Histogram
    pickup_latency: Histogram


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
        dispatched=Counter("scanqueue_scans_dispatched", "Scans published to the broker."),
        reaped=reaped,
    )


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
        pass

    def finished(self, run: RunInfo, row: ScanRow, duration_s: float) -> None:
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
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    aggregate = CollectorRegistry()
    aggregate.register(_CompactingCollector(MultiProcessCollector(None, path=path)))  # type: ignore[no-untyped-call]
    return aggregate


class _CompactingCollector:
    """The multiprocess collector, serialized with compaction (which it runs when due)."""

    def __init__(self, inner: MultiProcessCollector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        maybe_compact_multiprocess_dir()
        with _compact_lock:
            return iter(list(self.inner.collect()))  # type: ignore[no-untyped-call]


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
