"""A small, faithful re-creation of the old Go pool's model, in Python.

The model (what scanqueue replaced): one process, ``--workers`` worker threads
(2, like the old pool's default), each with its own database connection, no
broker.  Each worker loops:

    claim one queued row (CAS / SKIP LOCKED, attempts+1, started_at = db clock)
      ├─ got one ─▶ run the runner (no-op) ─▶ CAS running → completed ─▶ claim again
      └─ none ────▶ wait for a wake-up

Wake-ups: on SQLite a fixed-rate ticker every ``--poll`` seconds (500 ms);
on PostgreSQL ``LISTEN`` on the channel scanqueue's trigger notifies, plus the
same ticker as a safety poll.  A generation counter makes a wake-up that
arrives between a failed claim and the wait count.

It writes the same columns as scanqueue (status, attempts, started_at,
finished_at, heartbeat_at, worker_id), so the benchmark reads both the same way.

    python -m bench.old_pool DATABASE_URL [--workers 2] [--poll 0.5]

Stops on SIGTERM/SIGINT.  Prints ``old pool ready`` once it listens.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

CHANNEL = "scanqueue_scans"  # scanqueue's trigger notifies this channel

PG_CLAIM = """
UPDATE scans SET status = 'running', attempts = attempts + 1,
       started_at = clock_timestamp(), heartbeat_at = clock_timestamp(), worker_id = %s
 WHERE id = (SELECT id FROM scans WHERE status = 'queued'
              ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
   AND status = 'queued'
RETURNING id, attempts, providers_scanned, frameworks_scanned
"""
PG_FINISH = """
UPDATE scans SET status = 'completed', finished_at = clock_timestamp(), findings_count = 0
 WHERE id = %s AND status = 'running' AND attempts = %s
"""
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f','now')"
SQLITE_CLAIM = f"""
UPDATE scans SET status = 'running', attempts = attempts + 1,
       started_at = {SQLITE_NOW}, heartbeat_at = {SQLITE_NOW}, worker_id = ?
 WHERE id = (SELECT id FROM scans WHERE status = 'queued' ORDER BY created_at, id LIMIT 1)
   AND status = 'queued'
RETURNING id, attempts, providers_scanned, frameworks_scanned
"""
SQLITE_FINISH = f"""
UPDATE scans SET status = 'completed', finished_at = {SQLITE_NOW}, findings_count = 0
 WHERE id = ? AND status = 'running' AND attempts = ?
"""
MAX_WAIT_S = 1.0  # a worker re-checks the stop flag at least this often


class Wakeups:
    """A generation counter: ``bump`` wakes every waiting worker."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0

    def bump(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait_past(self, seen: int, timeout: float) -> None:
        with self._cond:
            if self.generation == seen:
                self._cond.wait(timeout)


def noop_runner(job_id: str) -> None:
    return None


class Pool:
    def __init__(self, url: str, workers: int, poll_s: float) -> None:
        self.url = url
        self.is_pg = url.startswith("postgres")
        self.workers = workers
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.wake = Wakeups()
        self.completed = 0
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        if self.is_pg:
            import psycopg2

            from bench.harness import psycopg_dsn

            conn = psycopg2.connect(psycopg_dsn(self.url), connect_timeout=5)
            conn.autocommit = True
            return conn
        path = self.url.split("sqlite:///", 1)[1]
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def worker(self, n: int) -> None:
        conn = self._connect()
        me = f"oldpool:{os.getpid()}:{n}"
        claim, finish = (PG_CLAIM, PG_FINISH) if self.is_pg else (SQLITE_CLAIM, SQLITE_FINISH)
        cur = conn.cursor()
        try:
            while not self.stop.is_set():
                seen = self.wake.generation
                cur.execute(claim, (me,))
                row = cur.fetchone()
                if row is None:
                    self.wake.wait_past(seen, MAX_WAIT_S)
                    continue
                noop_runner(row[0])
                cur.execute(finish, (row[0], row[1]))
                with self._lock:
                    self.completed += 1
        finally:
            conn.close()

    def ticker(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += self.poll_s
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.poll_s
            if self.stop.wait(next_at - now):
                return
            self.wake.bump()

    def listener(self, ready: threading.Event) -> None:
        conn = self._connect()
        with conn.cursor() as cur:
            cur.execute(f'LISTEN "{CHANNEL}"')
        ready.set()
        try:
            while not self.stop.is_set():
                readable, _, _ = select.select([conn], [], [], 0.5)
                if readable:
                    conn.poll()
                    if conn.notifies:
                        conn.notifies.clear()
                        self.wake.bump()
        finally:
            conn.close()

    def run(self) -> None:
        threads = [threading.Thread(target=self.ticker, name="ticker", daemon=True)]
        if self.is_pg:
            ready = threading.Event()
            threads.append(
                threading.Thread(target=self.listener, args=(ready,), name="listen", daemon=True)
            )
        threads += [
            threading.Thread(target=self.worker, args=(i,), name=f"w{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in threads:
            t.start()
        if self.is_pg:
            ready.wait(10)
        print("old pool ready", flush=True)
        while not self.stop.wait(0.5):
            pass
        for t in threads:
            t.join(5)
        print(f"old pool stopped after {self.completed} scans", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("database_url")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poll", type=float, default=0.5)
    args = parser.parse_args(argv)
    pool = Pool(args.database_url, args.workers, args.poll)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pool.stop.set())
    pool.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
