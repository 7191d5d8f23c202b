"""scanqueue's benchmark suite: one command, real processes, ratios measured in one run.

    .venv/bin/python -m bench.run            # full run (~15–25 min)
    .venv/bin/python -m bench.run --quick    # smoke (~3 min)
    .venv/bin/python -m bench.run --only pickup,throughput [--backend postgresql]
    .venv/bin/python -m bench.run --profile  # also py-spy the PostgreSQL throughput run

Phases (``--only`` takes a comma-separated list): ``floor`` (PostgreSQL only: the
pieces of the pickup target), ``pickup``, ``throughput``, ``stub50``, ``growth``,
``memory``, ``profile`` (off unless ``--profile`` or named).  Each phase runs on
PostgreSQL + Redis and on the embedded SQLite default (database and broker in
SQLite files), for scanqueue, raw Celery (``bench/raw_celery_app.py``) and the
old Go pool's model (``bench/old_pool.py``).

Writes ``bench/results/latest.json`` (and a timestamped copy) and prints a table.
Throwaway PostgreSQL databases, the Redis server and every process it started
are removed at the end, also on failure or Ctrl-C.  See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    BIN,
    REPO,
    CpuSplit,
    Db,
    Proc,
    RedisServer,
    children_of,
    clean_env,
    create_pg_database,
    drop_pg_database,
    free_port,
    loadavg,
    pg_version,
    psycopg_dsn,
    ratio,
    sqlite_version,
    summary_ms,
    tree_cpu_s,
    upgrade,
    vm_kib,
    wait_for,
    wait_for_load,
    worker_memory,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PHASES = ("floor", "pickup", "throughput", "stub50", "growth", "memory", "profile")
BACKENDS = ("postgresql", "sqlite")
NOOP_RUNNER = "bench.runners:noop"
WORKER_FLAGS = ("-l", "warning", "--without-heartbeat", "--without-gossip", "--without-mingle")
LOAD_OK = 2.0  # 1-minute load average we wait for (bounded) before a phase
LOAD_WAIT_S = 20.0


@dataclass(frozen=True)
class Sizes:
    pickup_n: int
    pickup_gap_s: tuple[float, float]
    throughput_n: dict[str, int]
    stub_n: int
    growth: tuple[int, ...]
    growth_pickup_n: int
    claim_reps: int
    floor_reps: int
    memory_n: int

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                pickup_n=12,
                pickup_gap_s=(0.05, 0.3),
                throughput_n={"postgresql": 600, "sqlite": 200},
                stub_n=200,
                growth=(1_000, 10_000, 100_000),
                growth_pickup_n=8,
                claim_reps=15,
                floor_reps=20,
                memory_n=150,
            )
        return cls(
            pickup_n=80,
            pickup_gap_s=(0.05, 0.3),
            throughput_n={"postgresql": 10_000, "sqlite": 2_000},
            stub_n=2_000,
            growth=(1_000, 100_000, 1_000_000),
            growth_pickup_n=40,
            claim_reps=50,
            floor_reps=100,
            memory_n=1_000,
        )


# -- the run's resources -----------------------------------------------------------------------


@dataclass
class Bench:
    sizes: Sizes
    tmp: Path
    redis: RedisServer | None = None
    procs: list[Proc] = field(default_factory=list)
    pg_dbs: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    stub_rounds: int = 1
    throughput_rounds: int = 1

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        for url in self.pg_dbs:
            drop_pg_database(url)
        self.pg_dbs.clear()

    # -- databases -----------------------------------------------------------------------

    def new_db(self, backend: str) -> Db:
        if backend == "postgresql":
            url = create_pg_database()
            self.pg_dbs.append(url)
        else:
            url = f"sqlite:///{self.tmp / f'scans-{uuid.uuid4().hex[:8]}.db'}"
        upgrade(url)
        return Db(url)

    def drop_db(self, db: Db) -> None:
        if db.is_pg:
            drop_pg_database(db.url)
            with contextlib.suppress(ValueError):
                self.pg_dbs.remove(db.url)
        else:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(db.path + suffix)

    def env(self, db: Db, **extra: str) -> dict[str, str]:
        if db.is_pg:
            assert self.redis is not None
            extra.setdefault("REDIS_URL", self.redis.url)
        return clean_env(db.url, **extra)

    def raw_broker(self, backend: str) -> str:
        if backend == "postgresql":
            assert self.redis is not None
            return self.redis.url
        return f"sqla+sqlite:///{self.tmp / f'raw-broker-{uuid.uuid4().hex[:8]}.db'}"

    # -- processes -----------------------------------------------------------------------

    def start(self, args: list[str], env: dict[str, str], name: str) -> Proc:
        proc = Proc(args, env, self.tmp, name)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)


# -- scanqueue and the old pool: rows in, rows out ------------------------------------------------


def bench_with_redis(quick: bool = False) -> Bench:
    """A Bench in a new temporary directory, with a Redis of its own started (the
    experiments' set-up; ``Bench.cleanup`` stops it)."""
    tmp = Path(tempfile.mkdtemp(prefix="scanqueue-bench-"))
    b = Bench(Sizes.for_mode(quick), tmp)
    b.redis = RedisServer(tmp)
    b.redis.start()
    return b


def start_scanqueue(
    b: Bench,
    db: Db,
    autoscale: str,
    *,
    runner: str | None = NOOP_RUNNER,
    without_bridge: bool = False,
    warm: int = 4,
    **extra: str,
) -> Proc:
    env = b.env(db, **extra)
    if runner:
        env["SCANQUEUE_RUNNER"] = runner
    args = [
        str(BIN / "celery"),
        "-A",
        "scanqueue",
        "worker",
        *WORKER_FLAGS,
        "-n",
        f"sq{uuid.uuid4().hex[:6]}@%h",
        f"--autoscale={autoscale}",
    ]
    if without_bridge:
        args.append("--without-bridge")
    proc = b.start(args, env, "sq-worker")
    if warm and not without_bridge:
        warm_up_rows(db, proc, warm)
    return proc


def start_old_pool(b: Bench, db: Db, workers: int = 2, poll_s: float = 0.5) -> Proc:
    env = clean_env(db.url)
    proc = b.start(
        [
            sys.executable,
            "-m",
            "bench.old_pool",
            db.url,
            "--workers",
            str(workers),
            "--poll",
            str(poll_s),
        ],
        env,
        "old-pool",
    )
    proc.wait_for_output("old pool ready", timeout=30)
    warm_up_rows(db, proc, 4)
    return proc


def warm_up_rows(db: Db, proc: Proc, n: int) -> None:
    """A few scans through every part (connections, leadership, pool processes)."""
    prefix = f"warm-{uuid.uuid4().hex[:6]}-"
    db.insert_queued_bulk([f"{prefix}{i}" for i in range(n)])

    def done() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        return db.count_unfinished(prefix) == 0

    wait_for(done, 120, interval=0.2, what=f"{proc.name} warm-up")


def exactly_once(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    bad = [r["id"] for r in rows if r["status"] != "completed" or r["attempts"] != 1]
    return {
        "expected": n,
        "rows": len(rows),
        "completed_attempts_1": len(rows) - len(bad),
        "ok": len(rows) == n and not bad,
        "bad_examples": bad[:5],
    }


def db_pickup(b: Bench, db: Db, n: int, proc: Proc) -> dict[str, Any]:
    """Insert ``n`` rows one at a time at idle (each after the previous one finished)."""
    prefix = f"pk-{uuid.uuid4().hex[:6]}-"
    lo, hi = b.sizes.pickup_gap_s
    with db.conn() as c:
        cur = c.cursor()
        for i in range(n):
            scan_id = f"{prefix}{i:05d}"
            time.sleep(random.uniform(lo, hi))
            cur.execute(db.insert_queued_sql(), (scan_id,))

            def finished(scan_id: str = scan_id) -> bool:
                cur.execute(f"SELECT status FROM scans WHERE id = {db.ph}", (scan_id,))
                row = cur.fetchone()
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
                return bool(row and row[0] in ("completed", "failed", "canceled"))

            wait_for(finished, 60, interval=0.01, what=f"pickup of {scan_id}")
        cur.close()
    rows = db.lifecycle(prefix)
    out = summary_ms([r["pickup_s"] for r in rows if r["pickup_s"] is not None])
    # Where the time goes: created → claimed by the bridge → started by a pool process.
    split = db.dispatch_split(prefix)
    if split:
        out["created_to_claimed"] = summary_ms([s[0] for s in split])
        out["claimed_to_started"] = summary_ms([s[1] for s in split])
        # The slowest pickups, by leg: which hop the tail (p99) lives in.
        slowest = sorted(split, key=lambda s: s[0] + s[1], reverse=True)[:4]
        out["slowest_ms"] = [
            {"created_to_claimed": round(a * 1000, 2), "claimed_to_started": round(c * 1000, 2)}
            for a, c in slowest
        ]
    out["exactly_once"] = exactly_once(rows, n)
    return out


def db_throughput(
    db: Db, n: int, proc: Proc, timeout_s: float, also: Proc | None = None
) -> dict[str, Any]:
    """A backlog of ``n`` rows in one INSERT; completions per second until the last one.

    CPU is ``proc``'s process tree, plus ``also``'s (a standalone bridge).
    """
    prefix = f"tp-{uuid.uuid4().hex[:6]}-"
    load_before = loadavg()

    def cpu_s() -> float:
        return tree_cpu_s(proc.pid) + (tree_cpu_s(also.pid) if also is not None else 0.0)

    cpu0 = cpu_s()
    split = CpuSplit(proc.pid, also.pid if also is not None else None)
    db.insert_queued_bulk([f"{prefix}{i:06d}" for i in range(n)])

    def done() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        return db.count_unfinished(prefix) == 0

    wait_for(done, timeout_s, interval=0.5, what=f"{n} scans through {proc.name}")
    cpu_ms = (cpu_s() - cpu0) * 1000.0 / n
    cpu_split = split.ms_per_item(n)
    rows = db.lifecycle(prefix)
    created = min(r["created"] for r in rows)
    first_start = min(r["started"] for r in rows)
    last_finish = max(r["finished"] for r in rows)
    return {
        "n": n,
        "per_s": round(n / (last_finish - created), 1),
        "per_s_first_start_to_last_finish": round(n / (last_finish - first_start), 1),
        "seconds": round(last_finish - created, 3),
        "cpu_ms_per_scan": round(cpu_ms, 3),
        "cpu_split_ms_per_scan": cpu_split,
        # started_at → finished_at: the part of a scan between its two CAS writes
        "run_ms": summary_ms([r["finished"] - r["started"] for r in rows]),
        "processes_used": len({r["worker_id"] for r in rows if r["worker_id"]}),
        "process_first_start_s": first_starts(
            [(r["worker_id"], r["started"]) for r in rows if r["worker_id"]], created
        ),
        "load_before": load_before,
        "load_after": loadavg(),
        "exactly_once": exactly_once(rows, n),
    }


def first_starts(runs: list[tuple[Any, float]], t0: float) -> list[float]:
    """Seconds from ``t0`` to each process's first run, in order: how fast the pool grew."""
    first: dict[Any, float] = {}
    for who, started in runs:
        first[who] = min(started, first.get(who, started))
    return sorted(round(v - t0, 2) for v in first.values())


# -- raw Celery -----------------------------------------------------------------------------------


class RawCelery:
    """A raw Celery worker (bench/raw_celery_app.py) and a publisher for it."""

    def __init__(
        self,
        b: Bench,
        backend: str,
        autoscale: str,
        extra_flags: tuple[str, ...] = (),
        warm: int = 4,
    ) -> None:
        from bench.raw_celery_app import make_app

        self.out = Path(tempfile.mkdtemp(prefix="raw-", dir=b.tmp))
        self.queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
        self.broker = b.raw_broker(backend)
        self.app = make_app(self.broker, self.queue)
        env = clean_env(
            "sqlite:///unused.db",
            BENCH_BROKER_URL=self.broker,
            BENCH_QUEUE=self.queue,
            BENCH_OUT=str(self.out),
        )
        self.proc = b.start(
            [
                str(BIN / "celery"),
                "-A",
                "bench.raw_celery_app",
                "worker",
                *WORKER_FLAGS,
                "-n",
                f"raw{uuid.uuid4().hex[:6]}@%h",
                f"--autoscale={autoscale}",
                *extra_flags,
            ],
            env,
            "raw-worker",
        )
        self.env = env
        self._seq = -1000
        # Each throughput run numbers its tasks from here, apart from earlier runs'.
        self.next_base = 1_000_000
        if warm:
            self.warm_up(warm)

    def publish(
        self, seq: int, task: str = "bench.noop", *extra: Any, producer: Any = None
    ) -> None:
        self.app.send_task(
            task, args=(seq, time.time(), *extra), queue=self.queue, producer=producer
        )

    def records(self) -> list[tuple[int, float, float, float, int]]:
        out = []
        for path in self.out.glob("raw-*.txt"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 5:
                    out.append(
                        (
                            int(parts[0]),
                            float(parts[1]),
                            float(parts[2]),
                            float(parts[3]),
                            int(parts[4]),
                        )
                    )
        return out

    def count(self, seqs: set[int]) -> int:
        return sum(1 for r in self.records() if r[0] in seqs)

    def _wait(self, seqs: set[int], timeout_s: float, interval: float) -> None:
        def done() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"raw worker exited:\n{self.proc.output()[-3000:]}")
            return self.count(seqs) >= len(seqs)

        wait_for(done, timeout_s, interval=interval, what="raw Celery tasks")

    def warm_up(self, n: int) -> None:
        seqs = set(range(self._seq - n + 1, self._seq + 1))
        self._seq -= n
        for s in seqs:
            self.publish(s)
        self._wait(seqs, 120, 0.2)

    def pickup(self, n: int, gap_s: tuple[float, float]) -> dict[str, Any]:
        base = 100_000
        for i in range(n):
            time.sleep(random.uniform(*gap_s))
            self.publish(base + i)
            self._wait({base + i}, 60, 0.01)
        recs = [r for r in self.records() if base <= r[0] < base + n]
        out = summary_ms([r[2] - r[1] for r in recs])
        out["exactly_once"] = self._once(recs, n)
        return out

    def throughput(
        self, n: int, timeout_s: float, task: str = "bench.noop", *extra: Any
    ) -> dict[str, Any]:
        load_before = loadavg()
        base = self.next_base
        self.next_base += 10 * n
        cpu0 = tree_cpu_s(self.proc.pid)
        split = CpuSplit(self.proc.pid)
        t0 = time.time()
        pub_cpu0 = time.process_time()
        with self.app.producer_or_acquire() as producer:
            for i in range(n):
                self.publish(base + i, task, *extra, producer=producer)
        published = time.time()
        pub_cpu = time.process_time() - pub_cpu0

        def done() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"raw worker exited:\n{self.proc.output()[-3000:]}")
            return sum(1 for r in self.records() if base <= r[0] < base + n) >= n

        wait_for(done, timeout_s, interval=0.5, what=f"{n} raw Celery tasks")
        cpu_ms = (tree_cpu_s(self.proc.pid) - cpu0 + pub_cpu) * 1000.0 / n
        # The publisher (this process) is moved from "other" to the worker's share.
        cpu_split = split.ms_per_item(n, extra_worker_s=pub_cpu)
        recs = [r for r in self.records() if base <= r[0] < base + n]
        last = max(r[3] for r in recs)
        first_start = min(r[2] for r in recs)
        return {
            "n": n,
            "per_s": round(n / (last - t0), 1),
            "per_s_first_start_to_last_finish": round(n / (last - first_start), 1),
            "seconds": round(last - t0, 3),
            "publish_per_s": round(n / max(published - t0, 1e-9), 1),
            "process_first_start_s": first_starts([(r[4], r[2]) for r in recs], t0),
            # worker (main + pool) plus the publisher's CPU, like scanqueue's embedded bridge
            "cpu_ms_per_scan": round(cpu_ms, 3),
            "cpu_split_ms_per_scan": cpu_split,
            "load_before": load_before,
            "load_after": loadavg(),
            "exactly_once": self._once(recs, n),
        }

    @staticmethod
    def _once(recs: list[tuple[int, float, float, float, int]], n: int) -> dict[str, Any]:
        counts = collections.Counter(r[0] for r in recs)
        dup = [s for s, c in counts.items() if c > 1]
        return {
            "expected": n,
            "rows": len(counts),
            "ok": len(counts) == n and not dup,
            "duplicates": len(dup),
        }


# -- phases ----------------------------------------------------------------------------------------


def phase_floor(b: Bench, backend: str) -> dict[str, Any]:
    """PostgreSQL: INSERT-with-trigger → LISTEN wake-up, and one claim-and-commit."""
    if backend != "postgresql":
        return {"skipped": "PostgreSQL only"}
    import select as select_mod

    db = b.new_db(backend)
    try:
        listen = db.connect()
        with listen.cursor() as cur:
            cur.execute('LISTEN "scanqueue_scans"')
        floors: list[float] = []
        with db.conn() as c, c.cursor() as cur:
            for i in range(b.sizes.floor_reps):
                time.sleep(random.uniform(0.01, 0.05))
                t0 = time.perf_counter()
                cur.execute(db.insert_queued_sql(), (f"floor-{i}",))
                got = False
                deadline = time.monotonic() + 5
                while not got and time.monotonic() < deadline:
                    if select_mod.select([listen], [], [], 1.0)[0]:
                        listen.poll()
                        got = bool(listen.notifies)
                        listen.notifies.clear()
                if got:
                    floors.append(time.perf_counter() - t0)
        listen.close()
        claims = time_claims(db, b.sizes.floor_reps)
        return {
            "insert_to_listen": summary_ms(floors),
            "raw_claim_and_commit": time_raw_claims(db, b.sizes.floor_reps),
            "claim_and_commit": claims["one_queued"],
            "claim_empty": claims["empty"],
        }
    finally:
        b.drop_db(db)


RAW_CLAIM_SQL = """
UPDATE scans SET dispatched_at = clock_timestamp(), dispatch_count = dispatch_count + 1
 WHERE id IN (SELECT id FROM scans WHERE status = 'queued' AND dispatched_at IS NULL
               ORDER BY created_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
RETURNING id
"""


def time_raw_claims(db: Db, reps: int) -> dict[str, Any]:
    """The floor of a claim: scanqueue's claim statement as plain SQL, one autocommit round trip."""
    times: list[float] = []
    with db.conn() as c, db.conn() as ins:
        cur, icur = c.cursor(), ins.cursor()
        for i in range(reps):
            icur.execute(db.insert_queued_sql(), (f"rawclaim-{i}",))
            t0 = time.perf_counter()
            cur.execute(RAW_CLAIM_SQL)
            got = cur.fetchall()
            times.append(time.perf_counter() - t0)
            assert [r[0] for r in got] == [f"rawclaim-{i}"], got
            icur.execute("UPDATE scans SET status = 'completed' WHERE id = %s", (f"rawclaim-{i}",))
    return summary_ms(times)


def time_claims(db: Db, reps: int) -> dict[str, Any]:
    """Direct ``Store.claim_for_dispatch`` calls (what the bridge does per wake-up)."""
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import Store

    store = Store(normalize_database_url(db.url))
    try:
        store.claim_for_dispatch(100)  # connect once: a long-running bridge holds its pool
        one: list[float] = []
        empty: list[float] = []
        prefix = f"claim-{uuid.uuid4().hex[:6]}-"
        with db.conn() as c:
            cur = c.cursor()
            for i in range(reps):
                cur.execute(db.insert_queued_sql(), (f"{prefix}{i}",))
                t0 = time.perf_counter()
                got = store.claim_for_dispatch(100)
                one.append(time.perf_counter() - t0)
                assert got == [f"{prefix}{i}"], got
                cur.execute(
                    f"UPDATE scans SET status = 'completed', attempts = 1 WHERE id = {db.ph}",
                    (f"{prefix}{i}",),
                )
                t0 = time.perf_counter()
                store.claim_for_dispatch(100)
                empty.append(time.perf_counter() - t0)
            cur.close()
        return {"one_queued": summary_ms(one), "empty": summary_ms(empty)}
    finally:
        store.dispose()


def phase_pickup(b: Bench, backend: str) -> dict[str, Any]:
    n, gap = b.sizes.pickup_n, b.sizes.pickup_gap_s
    out: dict[str, Any] = {}
    db = b.new_db(backend)
    try:
        wait_for_load(LOAD_OK, LOAD_WAIT_S)
        w = start_scanqueue(b, db, "2,2")
        out["scanqueue"] = db_pickup(b, db, n, w)
        out["scanqueue"]["load"] = loadavg()
        b.stop(w)
        raw = RawCelery(b, backend, "2,2")
        out["raw_celery"] = raw.pickup(n, gap)
        out["raw_celery"]["load"] = loadavg()
        b.stop(raw.proc)
        pool = start_old_pool(b, db)
        out["old_pool"] = db_pickup(b, db, n, pool)
        out["old_pool"]["load"] = loadavg()
        b.stop(pool)
    finally:
        b.drop_db(db)
    sq, rc, op = out["scanqueue"], out["raw_celery"], out["old_pool"]
    out["ratios"] = {
        "p50_vs_raw_celery": ratio(sq.get("p50_ms"), rc.get("p50_ms")),
        "p99_vs_raw_celery": ratio(sq.get("p99_ms"), rc.get("p99_ms")),
        "p50_vs_old_pool": ratio(sq.get("p50_ms"), op.get("p50_ms")),
        "p99_vs_old_pool": ratio(sq.get("p99_ms"), op.get("p99_ms")),
    }
    return out


def phase_throughput(b: Bench, backend: str) -> dict[str, Any]:
    n = b.sizes.throughput_n[backend]
    timeout = max(120.0, n / 15.0)
    out: dict[str, Any] = {}
    for conc in (2, 6):
        wait_for_load(LOAD_OK, LOAD_WAIT_S)
        db = b.new_db(backend)
        try:
            w = start_scanqueue(b, db, f"{conc},{conc}")
            out[f"scanqueue_c{conc}"] = db_throughput(db, n, w, timeout)
            out[f"scanqueue_c{conc}"]["memory"] = worker_memory(w.pid)
            b.stop(w)
            raw = RawCelery(b, backend, f"{conc},{conc}")
            out[f"raw_celery_c{conc}"] = raw.throughput(n, timeout)
            out[f"raw_celery_c{conc}"]["memory"] = worker_memory(raw.proc.pid)
            if conc == 2 and backend == "postgresql":
                out["raw_celery_c2_two_writes"] = raw_two_writes(raw, db, n, timeout)
            b.stop(raw.proc)
            if conc == 2:
                pool = start_old_pool(b, db)
                out["old_pool"] = db_throughput(db, n, pool, timeout)
                b.stop(pool)
                # Raw Celery's publisher is a process of its own; so is this bridge.
                bridge, w = start_standalone(b, db, f"{conc},{conc}")
                out["scanqueue_c2_standalone_bridge"] = db_throughput(db, n, w, timeout, bridge)
                b.stop(w)
                b.stop(bridge)
                if backend == "postgresql":  # kombu's SQL transport has no fanout for events
                    out.update(with_flower(b, db, n, timeout))
                    out["procrastinate_c2"] = procrastinate_throughput(b, n, timeout)
        finally:
            b.drop_db(db)
    out["ratios"] = {
        "c2_vs_raw_celery": ratio(out["scanqueue_c2"]["per_s"], out["raw_celery_c2"]["per_s"]),
        "c6_vs_raw_celery": ratio(out["scanqueue_c6"]["per_s"], out["raw_celery_c6"]["per_s"]),
        "c2_vs_old_pool": ratio(out["scanqueue_c2"]["per_s"], out["old_pool"]["per_s"]),
        "c6_vs_old_pool": ratio(out["scanqueue_c6"]["per_s"], out["old_pool"]["per_s"]),
        "c2_standalone_bridge_vs_raw_celery": ratio(
            out["scanqueue_c2_standalone_bridge"]["per_s"], out["raw_celery_c2"]["per_s"]
        ),
    }
    if "raw_celery_c2_two_writes" in out:
        out["ratios"]["c2_vs_raw_celery_two_writes"] = ratio(
            out["scanqueue_c2"]["per_s"], out["raw_celery_c2_two_writes"]["per_s"]
        )
    if "per_s" in out.get("procrastinate_c2", {}):
        out["ratios"]["c2_vs_procrastinate"] = ratio(
            out["scanqueue_c2"]["per_s"], out["procrastinate_c2"]["per_s"]
        )
        out["ratios"]["procrastinate_c2_vs_raw_celery"] = ratio(
            out["procrastinate_c2"]["per_s"], out["raw_celery_c2"]["per_s"]
        )
    if backend == "postgresql" and b.throughput_rounds > 1:
        first = {
            "scanqueue": out["scanqueue_c2"]["per_s"],
            "two_writes": out.get("raw_celery_c2_two_writes", {}).get("per_s"),
            "procrastinate": out.get("procrastinate_c2", {}).get("per_s"),
        }
        out["c2_rounds"] = c2_rounds(b, n, timeout, first)
        # The figures are the medians of the interleaved rounds.
        for key, value in out["c2_rounds"]["median"].items():
            out["ratios"][key] = value
    if "scanqueue_c2_events_flower" in out:
        out["ratios"]["c2_events_flower_vs_raw_celery_E"] = ratio(
            out["scanqueue_c2_events_flower"]["per_s"], out["raw_celery_c2_E_flower"]["per_s"]
        )
    return out


C2_ARMS = ("scanqueue", "two_writes", "procrastinate")
C2_RATIOS = {"c2_vs_raw_celery_two_writes": "two_writes", "c2_vs_procrastinate": "procrastinate"}


def c2_rounds(b: Bench, n: int, timeout: float, first: dict[str, Any]) -> dict[str, Any]:
    """No-op c2 on PostgreSQL against its yardsticks, over ``--throughput-rounds`` rounds.

    ``first`` is the phase's own round (its scanqueue_c2, two_writes and Procrastinate
    runs); each further round runs the three again in alternating order, scanqueue on
    a fresh database.  Returns every round's scans/s and ratios, and for each ratio
    the median (the lower middle one for an even count) with its min and max.
    """
    rounds: list[dict[str, Any]] = [dict(first)]
    for r in range(1, b.throughput_rounds):
        runs: dict[str, Any] = {"order": [], "runs": {}}
        for arm in C2_ARMS if r % 2 == 0 else C2_ARMS[::-1]:
            wait_for_load(LOAD_OK, LOAD_WAIT_S)
            run = c2_run(b, arm, n, timeout)
            runs["order"].append(arm)
            runs["runs"][arm] = run
            runs[arm] = run.get("per_s")
        rounds.append(runs)
    for runs in rounds:
        for key, arm in C2_RATIOS.items():
            runs[key] = ratio(runs["scanqueue"], runs[arm])
    median: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    for key in C2_RATIOS:
        values = [v for v in (runs[key] for runs in rounds) if v is not None]
        if values:
            median[key] = statistics.median_low(values)
            spread[key] = [min(values), max(values)]
    return {"rounds": rounds, "median": median, "min_max": spread}


def c2_run(b: Bench, arm: str, n: int, timeout: float) -> dict[str, Any]:
    """One c2 no-op run of ``arm`` (a C2_ARMS name), as its phase run reports it (with
    the exactly-once check that the suite's verdict collects)."""
    if arm == "procrastinate":
        return procrastinate_throughput(b, n, timeout)
    db = b.new_db("postgresql")
    try:
        if arm == "scanqueue":
            w = start_scanqueue(b, db, "2,2")
            run = db_throughput(db, n, w, timeout)
            b.stop(w)
        else:
            raw = RawCelery(b, "postgresql", "2,2")
            run = raw_two_writes(raw, db, n, timeout)
            b.stop(raw.proc)
        return run
    finally:
        b.drop_db(db)


def raw_two_writes(raw: RawCelery, db: Db, n: int, timeout: float) -> dict[str, Any]:
    """Raw Celery whose task makes a run's two CAS writes (start, finish) on ``scans``.

    The like-for-like yardstick for a no-op scan: the same two durable statements on
    the critical path of every pool process's cycle, with nothing of scanqueue's.
    """
    prefix = f"rw-{uuid.uuid4().hex[:6]}-"
    base = raw.next_base  # the first sequence number of the next throughput run
    db.insert_queued_bulk([f"{prefix}{base + i}" for i in range(n)])
    run = raw.throughput(n, timeout, "bench.two_writes", psycopg_dsn(db.url), prefix)
    rows = db.lifecycle(prefix)
    run["exactly_once"] = exactly_once(rows, n)
    run["run_ms"] = summary_ms([r["finished"] - r["started"] for r in rows])
    return run


def procrastinate_throughput(b: Bench, n: int, timeout: float) -> dict[str, Any]:
    """Procrastinate (bench/procrastinate_app.py), concurrency 2, on a database of its own."""
    try:
        from procrastinate import App, PsycopgConnector
    except ImportError:
        return {"skipped": "procrastinate not installed (pip install procrastinate)"}
    url = create_pg_database()
    b.pg_dbs.append(url)
    dsn = psycopg_dsn(url)
    env = clean_env(url, BENCH_PG_DSN=dsn)
    try:
        subprocess.run(
            [sys.executable, "-m", "bench.procrastinate_app", "schema"],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=60,
        )
        worker = b.start(
            [sys.executable, "-m", "bench.procrastinate_app", "worker", "2"], env, "procrastinate"
        )
        client = App(connector=PsycopgConnector(conninfo=dsn))
        db = Db(url)
        with client.open():
            noop = client.configure_task("bench.noop")
            noop.batch_defer(*[{"seq": -i} for i in range(1, 5)])
            wait_for(lambda: _procrastinate_done(db) >= 4, 120, interval=0.2, what="warm-up")
            load_before = loadavg()
            cpu0 = tree_cpu_s(worker.pid)
            split = CpuSplit(worker.pid)
            noop.batch_defer(*[{"seq": i} for i in range(n)])
            wait_for(
                lambda: _procrastinate_done(db) >= n + 4,
                timeout,
                interval=0.5,
                what=f"{n} procrastinate jobs",
            )
            cpu_ms = (tree_cpu_s(worker.pid) - cpu0) * 1000.0 / n
            cpu_split = split.ms_per_item(n)
        b.stop(worker)
        with db.conn() as conn:
            cur = conn.cursor()
            cur.execute(
                "SELECT EXTRACT(EPOCH FROM max(at) FILTER (WHERE type = 'succeeded')"
                " - min(at) FILTER (WHERE type = 'deferred')),"
                " count(*) FILTER (WHERE type = 'started'),"
                " count(DISTINCT job_id) FILTER (WHERE type = 'started')"
                " FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id"
                " WHERE (j.args->>'seq')::int >= 0"
            )
            seconds, starts, jobs_started = cur.fetchone()
        return {
            "n": n,
            "per_s": round(n / float(seconds), 1),
            "seconds": round(float(seconds), 3),
            "cpu_ms_per_scan": round(cpu_ms, 3),
            "cpu_split_ms_per_scan": cpu_split,
            "load_before": load_before,
            "load_after": loadavg(),
            "exactly_once": {"ok": starts == n and jobs_started == n, "starts": starts},
        }
    finally:
        drop_pg_database(url)
        with contextlib.suppress(ValueError):
            b.pg_dbs.remove(url)


def _procrastinate_done(db: Db) -> int:
    with db.conn() as conn:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
        return int(cur.fetchone()[0])


def with_flower(b: Bench, db: Db, n: int, timeout: float) -> dict[str, Any]:
    """Task events on and Flower attached: scanqueue against raw Celery with ``-E``."""
    out: dict[str, Any] = {}
    w = start_scanqueue(b, db, "2,2", CELERY_TASK_EVENTS="1")
    flower = start_flower(b, "scanqueue", b.env(db))
    out["scanqueue_c2_events_flower"] = db_throughput(db, n, w, timeout)
    b.stop(flower)
    b.stop(w)
    raw = RawCelery(b, "postgresql", "2,2", ("-E",))
    flower = start_flower(b, "bench.raw_celery_app", raw.env)
    out["raw_celery_c2_E_flower"] = raw.throughput(n, timeout)
    b.stop(flower)
    b.stop(raw.proc)
    return out


def start_flower(b: Bench, app: str, env: dict[str, str]) -> Proc:
    port = free_port()
    flower = b.start(
        [str(BIN / "celery"), "-A", app, "flower", f"--port={port}", "--address=127.0.0.1"],
        env,
        "flower",
    )
    wait_for(lambda: _http_ok(f"http://127.0.0.1:{port}/healthcheck"), 60, what="flower up")
    time.sleep(1.0)  # let it subscribe to the event stream
    return flower


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def start_standalone(b: Bench, db: Db, autoscale: str) -> tuple[Proc, Proc]:
    """``scanqueue bridge`` plus a ``--without-bridge`` worker, warmed up; (bridge, worker)."""
    env = b.env(db, SCANQUEUE_RUNNER=NOOP_RUNNER)
    bridge = b.start([str(BIN / "scanqueue"), "bridge"], env, "bridge")
    w = start_scanqueue(
        b, db, autoscale, without_bridge=True, SCANQUEUE_QUEUE=env["SCANQUEUE_QUEUE"]
    )
    bridge.wait_for_output("bridge running", timeout=60)
    warm_up_rows(db, w, 4)
    return bridge, w


STUB_ARMS = ("scanqueue", "scanqueue_grow_at_once", "raw_celery")


def phase_stub50(b: Bench, backend: str) -> dict[str, Any]:
    """The default 50 ms stub with --autoscale=6,2 against a 50 ms raw Celery task.

    With ``--stub-rounds`` N > 1 the three runs are repeated N times, in alternating
    order, each with a fresh worker.  The ratio is then the median round's (the lower
    of the two middle ones), and the top-level runs are that round's; one round's
    ratio swung 0.61-0.94 on this shared machine.
    """
    n = b.sizes.stub_n
    timeout = max(120.0, n / 5.0)
    rounds: list[dict[str, Any]] = []
    db = b.new_db(backend)
    try:
        for r in range(b.stub_rounds):
            runs: dict[str, Any] = {}
            for arm in STUB_ARMS if r % 2 == 0 else STUB_ARMS[::-1]:
                wait_for_load(LOAD_OK, LOAD_WAIT_S)
                runs[arm] = stub_run(b, db, backend, arm, n, timeout)
            rounds.append(runs)
    finally:
        b.drop_db(db)
    raw = [r["raw_celery"]["per_s"] for r in rounds]
    ratios = [ratio(r["scanqueue"]["per_s"], x) for r, x in zip(rounds, raw, strict=True)]
    grow0 = [
        ratio(r["scanqueue_grow_at_once"]["per_s"], x) for r, x in zip(rounds, raw, strict=True)
    ]
    median = ratios.index(statistics.median_low(ratios))
    # Celery's stock autoscaler grows on the first reserved message; scanqueue's
    # waits for a sustained backlog (issue 4) unless the backlog is many times
    # its processes (issue 18), as here.  The grow-at-once run prices what waiting
    # is left.
    out: dict[str, Any] = dict(rounds[median])
    out["ratio_vs_raw_celery"] = ratios[median]
    out["grow_at_once_ratio_vs_raw_celery"] = statistics.median_low(grow0)
    if len(rounds) > 1:
        out["rounds"] = [
            {
                "order": list(r),
                **{arm: r[arm]["per_s"] for arm in STUB_ARMS},
                "ratio_vs_raw_celery": ratios[i],
                "grow_at_once_ratio_vs_raw_celery": grow0[i],
                "first_scan_s": {arm: r[arm]["process_first_start_s"] for arm in STUB_ARMS},
                "load_before": {arm: r[arm]["load_before"] for arm in STUB_ARMS},
            }
            for i, r in enumerate(rounds)
        ]
        out["other_rounds"] = {f"round {i + 1}": r for i, r in enumerate(rounds) if i != median}
    return out


STUB_WARM = 2  # the autoscale minimum: warm-up scans, one at a time


def stub_run(b: Bench, db: Db, backend: str, arm: str, n: int, timeout: float) -> dict[str, Any]:
    """One run of ``n`` 50 ms scans (or raw Celery tasks) on a fresh --autoscale=6,2 worker.

    The warm-up sends one scan at a time, so every worker meets the backlog with the
    minimum of 2 processes: a batch of 4 at once grew raw Celery's pool (and
    scanqueue's with grow-after 0) before the backlog, for the 30 s keepalive.
    """
    if arm == "raw_celery":
        raw = RawCelery(b, backend, "6,2", warm=0)
        for _ in range(STUB_WARM):
            raw.warm_up(1)
        at_start = len(children_of(raw.proc.pid))
        result = raw.throughput(n, timeout, "bench.sleep", 0.05)
        result["memory"] = worker_memory(raw.proc.pid)
        b.stop(raw.proc)
    else:
        extra = {"SCANQUEUE_AUTOSCALE_GROW_AFTER": "0"} if arm == "scanqueue_grow_at_once" else {}
        # runner=None: the default StubRunner, 50 ms
        w = start_scanqueue(b, db, "6,2", runner=None, warm=0, **extra)
        for _ in range(STUB_WARM):
            warm_up_rows(db, w, 1)
        at_start = len(children_of(w.pid))
        result = db_throughput(db, n, w, timeout)
        result["memory"] = worker_memory(w.pid)
        b.stop(w)
    result["pool_processes_at_start"] = at_start
    return result


def add_finished_rows(db: Db, start: int, stop: int) -> float:
    """Bulk-insert finished rows ``start..stop-1``; returns seconds taken."""
    t0 = time.monotonic()
    if stop <= start:
        return 0.0
    if db.is_pg:
        db.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, created_at,"
            " started_at, finished_at, attempts, dispatched_at, dispatch_count)"
            " SELECT 'done-' || g, 'completed', '[\"aws\"]', '[\"soc2\"]',"
            " now() - interval '30 days' + g * interval '1 ms',"
            " now() - interval '30 days' + g * interval '1 ms',"
            " now() - interval '30 days' + g * interval '1 ms' + interval '50 ms', 1,"
            " now() - interval '30 days' + g * interval '1 ms', 1"
            " FROM generate_series(%s, %s) g",
            (start, stop - 1),
        )
        with db.conn() as c, c.cursor() as cur:
            cur.execute("VACUUM ANALYZE scans")
    else:
        ts = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-30 days', '+' || (g / 1000.0) || ' seconds')"
        with db.conn() as c:
            c.execute("BEGIN IMMEDIATE")
            c.execute(
                "WITH RECURSIVE s(g) AS (SELECT ? UNION ALL SELECT g + 1 FROM s WHERE g < ?)"
                " INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                " created_at, started_at, finished_at, attempts, dispatched_at, dispatch_count)"
                f" SELECT 'done-' || g, 'completed', '[\"aws\"]', '[\"soc2\"]', {ts}, {ts},"
                f" {ts}, 1, {ts}, 1 FROM s",
                (start, stop - 1),
            )
            c.execute("COMMIT")
            c.execute("ANALYZE")
    return round(time.monotonic() - t0, 2)


def phase_growth(b: Bench, backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    db = b.new_db(backend)
    have = 0
    try:
        for size in b.sizes.growth:
            fill_s = add_finished_rows(db, have, size)
            have = size
            wait_for_load(LOAD_OK, LOAD_WAIT_S)
            claims = time_claims(db, b.sizes.claim_reps)
            w = start_scanqueue(b, db, "2,2")
            pickup = db_pickup(b, db, b.sizes.growth_pickup_n, w)
            b.stop(w)
            out[str(size)] = {
                "finished_rows": size,
                "fill_s": fill_s,
                "claim_one": claims["one_queued"],
                "claim_empty": claims["empty"],
                "pickup": pickup,
                "load": loadavg(),
            }
    finally:
        b.drop_db(db)
    lo, hi = str(b.sizes.growth[0]), str(b.sizes.growth[-1])
    out["ratios"] = {
        "pickup_p50_largest_vs_smallest": ratio(
            out[hi]["pickup"].get("p50_ms"), out[lo]["pickup"].get("p50_ms")
        ),
        "pickup_p99_largest_vs_smallest": ratio(
            out[hi]["pickup"].get("p99_ms"), out[lo]["pickup"].get("p99_ms")
        ),
        "claim_p50_largest_vs_smallest": ratio(
            out[hi]["claim_one"].get("p50_ms"), out[lo]["claim_one"].get("p50_ms")
        ),
    }
    return out


def phase_memory(b: Bench, backend: str) -> dict[str, Any]:
    """Peak RSS (VmHWM) of a standalone bridge, a worker's main process and pool processes."""
    n = b.sizes.memory_n
    db = b.new_db(backend)
    try:
        bridge, w = start_standalone(b, db, "2,2")
        run = db_throughput(db, n, w, max(120.0, n / 10.0))
        out = {
            "scans": n,
            "bridge_vmhwm_mib": round((vm_kib(bridge.pid) or 0) / 1024.0, 1),
            "worker": worker_memory(w.pid),
            "exactly_once": run["exactly_once"],
            "per_s": run["per_s"],
        }
        b.stop(w)
        b.stop(bridge)
        return out
    finally:
        b.drop_db(db)


def phase_profile(b: Bench, backend: str) -> dict[str, Any]:
    """py-spy over a no-op throughput run at concurrency 2 (worker, bridge and pool)."""
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    n = b.sizes.throughput_n[backend] // 2
    db = b.new_db(backend)
    try:
        w = start_scanqueue(b, db, "2,2")
        raw_path = b.tmp / f"pyspy-{uuid.uuid4().hex[:6]}.txt"
        spy_proc = b.start(
            [
                spy,
                "record",
                "--pid",
                str(w.pid),
                "--subprocesses",
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(raw_path),
            ],
            os.environ.copy(),
            "py-spy",
        )
        time.sleep(2.0)
        run = db_throughput(db, n, w, max(120.0, n / 15.0))
        spy_proc.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy_proc.proc.wait(30)
        b.stop(spy_proc)
        main_pid = w.pid
        b.stop(w)
        summary = summarize_pyspy(raw_path, main_pid) if raw_path.exists() else {}
        keep = RESULTS_DIR / f"pyspy-throughput-{backend}.txt"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        if raw_path.exists():
            shutil.copy(raw_path, keep)
        return {"run": run, "collapsed_stacks": str(keep.relative_to(REPO)), **summary}
    finally:
        b.drop_db(db)


def summarize_pyspy(path: Path, main_pid: int) -> dict[str, Any]:
    """Top frames by self and inclusive samples, split into worker main process and pool."""
    roles: dict[str, dict[str, collections.Counter[str]]] = {}
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        # With --subprocesses a pool process's stack hangs under its parent's, each
        # introduced by a "process PID:cmdline" frame: the last one is the sampled process.
        marks = [i for i, f in enumerate(frames) if f.startswith("process ")]
        role = "main"
        if marks:
            pid_s = frames[marks[-1]].split()[1].split(":", 1)[0]
            role = "main" if pid_s.isdigit() and int(pid_s) == main_pid else "pool"
            frames = frames[marks[-1] + 1 :]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        idle = _is_idle(frames[-1])
        key = f"{role}{'_idle' if idle else ''}"
        totals[key] += count
        if idle:
            continue
        r = roles.setdefault(role, {"self": collections.Counter(), "incl": collections.Counter()})
        r["self"][_fn(frames[-1])] += count
        for fn in {_fn(f) for f in frames}:
            r["incl"][fn] += count
    out: dict[str, Any] = {"samples": dict(totals)}
    for role, r in roles.items():
        busy = sum(r["self"].values()) or 1
        out[role] = {
            "busy_samples": busy,
            "top_self": [(k, round(100 * v / busy, 1)) for k, v in r["self"].most_common(15)],
            "top_inclusive": [
                (k, round(100 * v / busy, 1))
                for k, v in r["incl"].most_common(60)
                if any(m in k for m in ("scanqueue", "sqlalchemy", "kombu", "celery", "psycopg"))
            ][:25],
        }
    return out


def _fn(frame: str) -> str:
    # "function (path/to/file.py:123)" → "function (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    for anchor in ("site-packages", "scanqueue", "bench"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            path = "/".join(parts[i + (1 if anchor == "site-packages" else 0) :])
            break
    else:
        path = parts[-1]
    return f"{name} ({path})"


def _is_idle(frame: str) -> bool:
    return any(
        s in frame
        for s in ("select (", "poll (", "wait (", "sleep", "_wait_for_tstate_lock", "epoll", "recv")
    )


# -- targets -------------------------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float | None, cmp: str, note: str = "") -> None:
        met = None
        if value is not None and limit is not None:
            met = value <= limit if cmp == "<=" else value >= limit
        out.append(
            {
                "target": name,
                "value": value,
                "limit": None if limit is None else round(limit, 3),
                "cmp": cmp,
                "met": met,
                "note": note,
            }
        )

    pg = res.get("postgresql", {})
    lite = res.get("sqlite", {})
    fl, pk = pg.get("floor", {}), pg.get("pickup", {})
    if "insert_to_listen" in fl and "raw_celery" in pk:
        # The target's floor takes the claim as plain SQL (one round trip); scanqueue's
        # own Store.claim_for_dispatch is reported beside it (it is part of what is judged).
        claims = [("raw_claim_and_commit", "plain-SQL claim"), ("claim_and_commit", "Store claim")]
        for key, what in claims:
            if key not in fl:
                continue
            for q in ("p50_ms", "p99_ms"):
                floor = fl["insert_to_listen"][q] + fl[key][q] + pk["raw_celery"][q]
                add(
                    f"PostgreSQL pickup {q[:3]} ≤ 1.25 × floor sum, {what} (ms)",
                    pk["scanqueue"][q],
                    1.25 * floor,
                    "<=",
                    f"floor {floor:.2f} ms = LISTEN {fl['insert_to_listen'][q]} + {what} "
                    f"{fl[key][q]} + raw Celery hop {pk['raw_celery'][q]}",
                )
    for backend, data in (("PostgreSQL", pg), ("SQLite", lite)):
        tp = data.get("throughput", {})
        if "ratios" in tp:
            add(
                f"{backend} no-op throughput c2 ≥ 0.6 × raw Celery (ratio)",
                tp["ratios"]["c2_vs_raw_celery"],
                0.6,
                ">=",
            )
        if tp.get("ratios", {}).get("c2_vs_procrastinate") is not None:
            add(
                f"{backend} no-op throughput c2 ≥ Procrastinate c2 (ratio)",
                tp["ratios"]["c2_vs_procrastinate"],
                1.0,
                ">=",
                f"Procrastinate itself {tp['ratios']['procrastinate_c2_vs_raw_celery']} "
                "× raw Celery",
            )
        spread = tp.get("c2_rounds", {}).get("min_max", {})
        rounds_note = (
            f"median of {len(tp['c2_rounds']['rounds'])} interleaved rounds"
            if "c2_rounds" in tp
            else "one round (--throughput-rounds for more)"
        )
        for key, factor, what in (
            ("c2_vs_raw_celery_two_writes", 0.9, "raw Celery with the two CAS writes"),
            ("c2_vs_procrastinate", 3.0, "Procrastinate c2"),
        ):
            if tp.get("ratios", {}).get(key) is not None:
                low_high = spread.get(key)
                add(
                    f"{backend} no-op throughput c2 ≥ {factor:g} × {what} (ratio)",
                    tp["ratios"][key],
                    factor,
                    ">=",
                    f"issue 18; {rounds_note}"
                    + (f", min–max {low_high[0]}–{low_high[1]}" if low_high else ""),
                )
        if tp.get("ratios", {}).get("c2_events_flower_vs_raw_celery_E") is not None:
            add(
                f"{backend} no-op throughput c2, task events + Flower ≥ 0.6 × raw Celery -E",
                tp["ratios"]["c2_events_flower_vs_raw_celery_E"],
                0.6,
                ">=",
                "both with Flower attached to the same broker",
            )
        if tp.get("ratios", {}).get("c2_standalone_bridge_vs_raw_celery") is not None:
            add(
                f"{backend} no-op throughput c2, standalone bridge ≥ 0.6 × raw Celery (ratio)",
                tp["ratios"]["c2_standalone_bridge_vs_raw_celery"],
                0.6,
                ">=",
                "bridge in its own process, like raw Celery's publisher; CPU includes it",
            )
        st = data.get("stub50", {})
        if "ratio_vs_raw_celery" in st:
            add(
                f"{backend} 50 ms stub, --autoscale=6,2 ≥ 0.95 × raw Celery (ratio)",
                st["ratio_vs_raw_celery"],
                0.95,
                ">=",
                "issue 18 (issue 8 asked 0.9)",
            )
        gr = data.get("growth", {})
        if "ratios" in gr:
            add(
                f"{backend} pickup p50 at largest table ≤ 1.2 × smallest (ratio)",
                gr["ratios"]["pickup_p50_largest_vs_smallest"],
                1.2,
                "<=",
            )
    lpk = lite.get("pickup", {})
    if "ratios" in lpk:
        add(
            "SQLite pickup p50 ≤ 1.2 × old pool (ratio)",
            lpk["ratios"]["p50_vs_old_pool"],
            1.2,
            "<=",
        )
        add(
            "SQLite pickup p99 ≤ one poll interval (ms)",
            lpk["scanqueue"].get("p99_ms"),
            500.0,
            "<=",
        )
    once = list(_exactly_once_checks(res))
    add(
        "every row of every run completed exactly once (runs failing)",
        float(sum(1 for _, ok in once if not ok)),
        0.0,
        "<=",
        f"{len(once)} runs checked",
    )
    return out


def _exactly_once_checks(node: Any, path: str = "") -> Iterator[tuple[str, bool]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "exactly_once" and isinstance(v, dict) and "ok" in v:
                yield path, bool(v["ok"])
            else:
                yield from _exactly_once_checks(v, f"{path}/{k}")
    elif isinstance(node, list):  # the rounds of a repeated phase
        for i, v in enumerate(node):
            yield from _exactly_once_checks(v, f"{path}/{i}")


# -- output --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import celery
    import kombu
    import sqlalchemy

    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "postgresql": _safe(pg_version),
        "sqlite": sqlite_version(),
    }


def _safe(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:
        return f"unavailable: {exc}"


def print_table(res: dict[str, Any]) -> None:
    def g(d: Any, *keys: str) -> Any:
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return "–"
            d = d[k]
        return d

    print()
    print(
        f"scanqueue bench ({res['meta']['mode']}), load {res['meta']['load_start']} → "
        f"{res['meta']['load_end']}, {res['meta']['duration_s']:.0f} s"
    )
    for backend in BACKENDS:
        d = res.get(backend)
        if not d:
            continue
        print(f"\n== {backend} ==")
        pk = d.get("pickup", {})
        for who in ("scanqueue", "raw_celery", "old_pool"):
            print(
                f"  pickup {who:<11} p50 {g(pk, who, 'p50_ms'):>8} ms"
                f"  p99 {g(pk, who, 'p99_ms'):>8} ms"
            )
        if "ratios" in pk:
            print(f"  pickup ratios {pk['ratios']}")
        tp = d.get("throughput", {})
        for who in (
            "scanqueue_c2",
            "scanqueue_c2_standalone_bridge",
            "scanqueue_c2_events_flower",
            "raw_celery_c2",
            "raw_celery_c2_E_flower",
            "procrastinate_c2",
            "old_pool",
            "scanqueue_c6",
            "raw_celery_c6",
        ):
            print(f"  throughput {who:<14} {g(tp, who, 'per_s'):>8} /s")
        if "ratios" in tp:
            print(f"  throughput ratios {tp['ratios']}")
        for i, r in enumerate(tp.get("c2_rounds", {}).get("rounds", []), 1):
            print(
                f"    c2 round {i}: "
                + ", ".join(f"{arm} {r.get(arm)}/s" for arm in C2_ARMS)
                + "; "
                + ", ".join(f"{key} {r.get(key)}" for key in C2_RATIOS)
            )
        st = d.get("stub50", {})
        print(
            f"  50 ms stub 6,2: scanqueue {g(st, 'scanqueue', 'per_s')}/s raw "
            f"{g(st, 'raw_celery', 'per_s')}/s ratio {g(st, 'ratio_vs_raw_celery')}; "
            f"grow after 0: {g(st, 'scanqueue_grow_at_once', 'per_s')}/s ratio "
            f"{g(st, 'grow_at_once_ratio_vs_raw_celery')}"
        )
        for who in STUB_ARMS:
            firsts = g(st, who, "process_first_start_s")
            if isinstance(firsts, list):
                print(
                    f"    {who:<22} {g(st, who, 'pool_processes_at_start')} processes at the"
                    f" backlog; each one's first scan at {firsts} s"
                )
        for i, r in enumerate(st.get("rounds", []), 1):
            print(
                f"    round {i}: "
                + ", ".join(f"{arm} {r[arm]}/s" for arm in r["order"])
                + f"; ratio {r['ratio_vs_raw_celery']}, grow after 0"
                f" {r['grow_at_once_ratio_vs_raw_celery']}"
            )
        gr = d.get("growth", {})
        for k, v in gr.items():
            if k != "ratios" and isinstance(v, dict):
                print(
                    f"  growth {k:>8} rows: pickup p50 {g(v, 'pickup', 'p50_ms')} p99 "
                    f"{g(v, 'pickup', 'p99_ms')} ms; claim p50 {g(v, 'claim_one', 'p50_ms')} ms"
                )
        fl = d.get("floor", {})
        if "insert_to_listen" in fl:
            print(
                f"  floor: LISTEN p50 {fl['insert_to_listen']['p50_ms']} ms, claim p50 "
                f"{fl['claim_and_commit']['p50_ms']} ms"
            )
        mem = d.get("memory", {})
        if mem:
            print(f"  memory: bridge {g(mem, 'bridge_vmhwm_mib')} MiB, worker {g(mem, 'worker')}")
    print("\n== targets ==")
    for t in res.get("targets", []):
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        print(
            f"  [{mark:>7}] {t['target']}: {t['value']} (limit {t['cmp']} {t['limit']}) {t['note']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scanqueue benchmark suite")
    parser.add_argument("--quick", action="store_true", help="small sizes (~3 min smoke)")
    parser.add_argument("--only", default="", help=f"comma-separated phases of {PHASES}")
    parser.add_argument("--backend", default="", help="postgresql or sqlite (default both)")
    parser.add_argument("--profile", action="store_true", help="also run the py-spy phase")
    parser.add_argument("--out", default=str(RESULTS_DIR / "latest.json"))
    parser.add_argument(
        "--stub-rounds",
        type=int,
        default=1,
        help="repeat the stub50 runs, alternating their order; report the median round",
    )
    parser.add_argument(
        "--throughput-rounds",
        type=int,
        default=1,
        help="PostgreSQL no-op c2: repeat scanqueue, the two-writes yardstick and"
        " Procrastinate, alternating their order; report the median ratios",
    )
    args = parser.parse_args(argv)
    if args.stub_rounds < 1:
        parser.error("--stub-rounds must be at least 1")
    if args.throughput_rounds < 1:
        parser.error("--throughput-rounds must be at least 1")

    phases = [p for p in args.only.split(",") if p] or [
        p for p in PHASES if p != "profile" or args.profile
    ]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    backends = [args.backend] if args.backend else list(BACKENDS)

    tmp = Path(tempfile.mkdtemp(prefix="scanqueue-bench-"))
    bench = Bench(
        Sizes.for_mode(args.quick),
        tmp,
        stub_rounds=args.stub_rounds,
        throughput_rounds=args.throughput_rounds,
    )

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    res: dict[str, Any] = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "machine": machine(),
            "load_start": loadavg(),
            "sizes": bench.sizes.__dict__,
            "stub_rounds": args.stub_rounds,
            "throughput_rounds": args.throughput_rounds,
            "phases": phases,
            "errors": [],
        }
    }
    funcs: dict[str, Callable[[Bench, str], dict[str, Any]]] = {
        "floor": phase_floor,
        "pickup": phase_pickup,
        "throughput": phase_throughput,
        "stub50": phase_stub50,
        "growth": phase_growth,
        "memory": phase_memory,
        "profile": phase_profile,
    }
    rc = 0
    try:
        if "postgresql" in backends:
            bench.redis = RedisServer(tmp)
            bench.redis.start()
            res["meta"]["machine"]["redis"] = bench.redis.version()
        for phase in phases:
            for backend in backends:
                t0 = time.monotonic()
                print(f"[{time.strftime('%H:%M:%S')}] {backend} {phase} …", flush=True)
                try:
                    res.setdefault(backend, {})[phase] = funcs[phase](bench, backend)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    rc = 1
                    res.setdefault(backend, {})[phase] = {"error": str(exc)[-2000:]}
                    res["meta"]["errors"].append(
                        {
                            "phase": phase,
                            "backend": backend,
                            "trace": traceback.format_exc()[-3000:],
                        }
                    )
                    print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
                    for p in list(bench.procs):
                        if p.name != "redis":
                            bench.stop(p)
                print(f"  done in {time.monotonic() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        rc = 130
        res["meta"]["errors"].append({"phase": "interrupted"})
    finally:
        bench.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    res["meta"]["load_end"] = loadavg()
    res["meta"]["duration_s"] = round(time.time() - started, 1)
    res["targets"] = targets(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2, default=str)
    out.write_text(text)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    (out.parent / f"run-{stamp}-{res['meta']['mode']}.json").write_text(text)
    print_table(res)
    print(f"\nwrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
