"""Process and service plumbing for the benchmark: throwaway Redis and PostgreSQL
databases, real worker/bridge processes in their own process groups, and the
small statistics the report needs.

Adapted from ``tests/conftest.py`` (copied, not imported, so the bench does not
depend on pytest or on fixtures other engineers are editing).  Everything binds
to loopback only; every wait is bounded; only processes started here are
signalled, by their own process group.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests import support
from tests.support import Proc as Proc
from tests.support import RedisServer as RedisServer
from tests.support import free_port as free_port
from tests.support import wait_for as wait_for

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# -- statistics ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0–100), nearest-rank on the sorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values_s: list[float]) -> dict[str, Any]:
    """p50/p90/p99/mean/max in milliseconds of a list of seconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50) or 0.0, 3),
        "p90_ms": round(pct(ms, 90) or 0.0, 3),
        "p99_ms": round(pct(ms, 99) or 0.0, 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


# -- Redis ----------------------------------------------------------------------------------


# -- PostgreSQL -------------------------------------------------------------------------------


def create_pg_database() -> str:
    return support.create_pg_database(PG_ADMIN_URL, prefix="sq_bench_")


def drop_pg_database(url: str) -> None:
    support.drop_pg_database(url, PG_ADMIN_URL)


def pg_version() -> str:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        row = cur.fetchone()
    conn.close()
    return str(row[0]) if row else "?"


def upgrade(url: str) -> None:
    """``scanqueue db upgrade`` through the CLI (a real process, like a deploy)."""
    env = clean_env(url)
    result = subprocess.run(
        [str(BIN / "scanqueue"), "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise RuntimeError(f"db upgrade failed: {result.stderr.strip()}")


def psycopg_dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Db:
    """Plain-SQL access to the ``scans`` table, the way another program has it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_pg = url.startswith("postgres")
        self.path = url.split("sqlite:///", 1)[1] if not self.is_pg else ""

    def connect(self) -> Any:
        if self.is_pg:
            import psycopg2

            conn = psycopg2.connect(psycopg_dsn(self.url), connect_timeout=5)
            conn.autocommit = True
            return conn
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextlib.contextmanager
    def conn(self) -> Iterator[Any]:
        c = self.connect()
        try:
            yield c
        finally:
            c.close()

    @property
    def ph(self) -> str:
        return "%s" if self.is_pg else "?"

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.conn() as c:
            cur = c.cursor()
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
            cur.close()
            return list(rows)

    def insert_queued_sql(self) -> str:
        return (
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
            f" VALUES ({self.ph}, 'queued', '[\"aws\"]', '[\"soc2\"]')"
        )

    def insert_queued_bulk(self, ids: list[str]) -> None:
        """One transaction, many rows (a backlog arriving at once)."""
        with self.conn() as c:
            cur = c.cursor()
            if self.is_pg:
                cur.execute(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                    " SELECT unnest(%s::text[]), 'queued', '[\"aws\"]', '[\"soc2\"]'",
                    (ids,),
                )
            else:
                cur.execute("BEGIN IMMEDIATE")
                cur.executemany(self.insert_queued_sql(), [(i,) for i in ids])
                cur.execute("COMMIT")
            cur.close()

    def lifecycle(self, prefix: str) -> list[dict[str, Any]]:
        """Rows whose id starts with ``prefix``, with durations computed by the database."""
        if self.is_pg:
            sql = (
                "SELECT id, status, attempts,"
                " EXTRACT(EPOCH FROM (started_at - created_at)),"
                " EXTRACT(EPOCH FROM started_at), EXTRACT(EPOCH FROM finished_at),"
                " EXTRACT(EPOCH FROM created_at), worker_id"
                " FROM scans WHERE id LIKE %s"
            )
        else:
            sql = (
                "SELECT id, status, attempts,"
                " (julianday(started_at) - julianday(created_at)) * 86400.0,"
                " (julianday(started_at) - 2440587.5) * 86400.0,"
                " (julianday(finished_at) - 2440587.5) * 86400.0,"
                " (julianday(created_at) - 2440587.5) * 86400.0, worker_id"
                " FROM scans WHERE id LIKE ?"
            )
        rows = self.execute(sql, (prefix + "%",))
        out = []
        for r in rows:
            out.append(
                {
                    "id": r[0],
                    "status": r[1],
                    "attempts": r[2],
                    "pickup_s": None if r[3] is None else float(r[3]),
                    "started": None if r[4] is None else float(r[4]),
                    "finished": None if r[5] is None else float(r[5]),
                    "created": None if r[6] is None else float(r[6]),
                    "worker_id": r[7],
                }
            )
        return out

    def dispatch_split(self, prefix: str) -> list[tuple[float, float]]:
        """(created → claimed by the bridge, claimed → started) per row, database clock."""
        if self.is_pg:
            sql = (
                "SELECT EXTRACT(EPOCH FROM (dispatched_at - created_at)),"
                " EXTRACT(EPOCH FROM (started_at - dispatched_at))"
                " FROM scans WHERE id LIKE %s AND dispatched_at IS NOT NULL"
            )
        else:
            sql = (
                "SELECT (julianday(dispatched_at) - julianday(created_at)) * 86400.0,"
                " (julianday(started_at) - julianday(dispatched_at)) * 86400.0"
                " FROM scans WHERE id LIKE ? AND dispatched_at IS NOT NULL"
            )
        return [
            (float(a), float(b))
            for a, b in self.execute(sql, (prefix + "%",))
            if a is not None and b is not None
        ]

    def count_unfinished(self, prefix: str) -> int:
        rows = self.execute(
            f"SELECT count(*) FROM scans WHERE id LIKE {self.ph}"
            " AND status NOT IN ('completed', 'failed', 'canceled')",
            (prefix + "%",),
        )
        return int(rows[0][0])


def sqlite_version() -> str:
    return sqlite3.sqlite_version


# -- processes ----------------------------------------------------------------------------------


def clean_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("SCANQUEUE_", "CELERY_", "REDIS_URL", "DATABASE_URL", "OPENLINEAGE", "BENCH_")
        )
    }
    env.update(
        DATABASE_URL=database_url,
        SCANQUEUE_QUEUE=f"sq-bench-{uuid.uuid4().hex[:8]}",
        SCANQUEUE_CONNECT_TIMEOUT="30",
        PYTHONPATH=str(REPO),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        CELERY_SOFT_SHUTDOWN_TIMEOUT="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra)
    return env


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                kids.extend(int(x) for x in text.split())
    return kids


def vm_kib(pid: int, field: str = "VmHWM") -> int | None:
    """A field of /proc/<pid>/status in KiB (VmHWM = peak resident set)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def worker_memory(pid: int) -> dict[str, Any]:
    kids = children_of(pid)
    pool = [k for k in (vm_kib(k) for k in kids) if k is not None]
    return {
        "main_vmhwm_mib": _mib(vm_kib(pid)),
        "pool_vmhwm_mib_max": _mib(max(pool)) if pool else None,
        "pool_processes": len(pool),
    }


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024.0, 1)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_load(max_load: float, timeout_s: float) -> list[float]:
    """Give other engineers' runs a moment to finish before a sensitive phase (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        one = loadavg()[0]
        if one <= max_load:
            break
        time.sleep(2)
    return loadavg()


def proc_cpu_s(pid: int, reaped_children: bool = False) -> float:
    """CPU seconds (user + system) of one process, and of its reaped children if
    asked; 0 when it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # fields[11..14] = utime, stime, cutime, cstime (stat fields 14–17)
        used = int(fields[11]) + int(fields[12])
        if reaped_children:
            used += int(fields[13]) + int(fields[14])
        return used / os.sysconf("SC_CLK_TCK")
    return 0.0


def pids_named(comm: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    out.append(int(entry.name))
    return out


class CpuSplit:
    """Where the machine's CPU went during a run: this worker, PostgreSQL, Redis, the rest.

    PostgreSQL is every ``postgres`` process and Redis every ``redis-server`` (the
    machine's own servers count too, idle when nobody else runs); backends that
    ended during the run are missed.  ``machine`` is all CPUs' busy time from
    ``/proc/stat``; ``other`` what is left of it (the benchmark's own polling, the
    raw publisher, other users of the machine).
    """

    def __init__(self, worker_pid: int, also_pid: int | None = None) -> None:
        self.worker_pid, self.also_pid = worker_pid, also_pid
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        worker = tree_cpu_s(self.worker_pid)
        if self.also_pid is not None:
            worker += tree_cpu_s(self.also_pid)
        return {
            "worker": worker,
            "postgres": sum(proc_cpu_s(p) for p in pids_named("postgres")),
            "redis": sum(proc_cpu_s(p) for p in pids_named("redis-server")),
            "machine": machine_busy_s(),
        }

    def ms_per_item(self, n: int, extra_worker_s: float = 0.0) -> dict[str, float]:
        end = self._sample()
        d = {k: end[k] - self.start[k] for k in end}
        d["worker"] += extra_worker_s
        d["other"] = d["machine"] - d["worker"] - d["postgres"] - d["redis"]
        return {k: round(v * 1000.0 / n, 3) for k, v in d.items()}


def machine_busy_s() -> float:
    """Busy CPU seconds of all CPUs since boot (everything but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(x) for x in fields[:8]]
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process, its live children and reaped ones."""
    return proc_cpu_s(pid, reaped_children=True) + sum(proc_cpu_s(p) for p in children_of(pid))
