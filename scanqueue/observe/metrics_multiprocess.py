"""Prometheus multiprocess mode: the directory a prefork worker's processes share.

Under Celery's prefork pool the scans run in pool processes while ``/metrics``
is served by the worker's main process, so a worker uses prometheus_client's
multiprocess mode: every process writes its values to mmap files in
``PROMETHEUS_MULTIPROC_DIR`` and the main process serves their aggregate
(:func:`aggregate_registry`).  prometheus_client picks the mode when a metric
value is created, so the directory must be in the environment before the first
metric exists in the main process and before the pool forks —
:func:`prepare_multiprocess_dir` (called by the worker bootstep's constructor)
does that.  Gauges that only the main process sets use ``livemax``: forked
children write ``0`` for every metric they inherit, and ``max`` over live
processes ignores those (:func:`mark_process_dead` removes a child's gauge
files).

This module owns that directory: preparing it, dropping a dead pool process's
live gauges, and compacting dead processes' files so that autoscale churn does
not grow it with the uptime.  The metrics themselves live in
:mod:`scanqueue.observe.metrics`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
    from time import monotonic

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


def aggregate_registry(path: str) -> CollectorRegistry:
    """A registry that serves every process's files in ``path`` (compacting when due)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    aggregate = CollectorRegistry()
    aggregate.register(CompactingCollector(MultiProcessCollector(None, path=path)))  # type: ignore[no-untyped-call]
    return aggregate


class CompactingCollector:
    """The multiprocess collector, serialized with compaction (which it runs when due)."""

    def __init__(self, inner: MultiProcessCollector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        maybe_compact_multiprocess_dir()
        with _compact_lock:
            return iter(list(self.inner.collect()))  # type: ignore[no-untyped-call]
