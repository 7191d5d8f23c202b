"""A tiny raw Celery app: the yardstick scanqueue is measured against.

Same broker, same reliable settings as scanqueue's defaults (late acks, reject
on worker lost, prefetch 1, results ignored, task events off), run with the
same worker flags.  Each task appends ``seq t_publish t_start t_end pid`` to a
file of its own pool process, so publish→start latency and completion times
are read afterwards without a result backend.

Environment: ``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_OUT`` (a directory).
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

from celery import Celery

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "memory://")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-raw")
OUT_DIR = os.environ.get("BENCH_OUT", "/tmp")


def make_app(broker_url: str, queue: str) -> Celery:
    """A Celery app with scanqueue's reliable settings (also used by the publisher)."""
    if broker_url.startswith(("sqla+", "sqlalchemy+")):
        # The embedded SQLite broker is kombu's SQLAlchemy transport; scanqueue registers
        # a subclass that accepts polling_interval.  Use the very same transport.
        from scanqueue.worker import broker_sqlite

        broker_sqlite.register()
        options: dict[str, Any] = {"polling_interval": 0.1}
    else:
        options = {"visibility_timeout": 3600}
    celery_app = Celery("bench_raw")
    celery_app.conf.update(
        broker_url=broker_url,
        broker_transport_options=options,
        task_default_queue=queue,
        task_ignore_result=True,
        result_backend=None,
        accept_content=["json"],
        task_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=True,
    )
    return celery_app


app = make_app(BROKER_URL, QUEUE)

_out: tuple[int, IO[str]] | None = None


def _record(seq: int, t_pub: float, t_start: float) -> None:
    global _out
    pid = os.getpid()
    if _out is None or _out[0] != pid:
        _out = (pid, open(os.path.join(OUT_DIR, f"raw-{pid}.txt"), "a"))  # noqa: SIM115
    _out[1].write(f"{seq} {t_pub:.6f} {t_start:.6f} {time.time():.6f} {pid}\n")
    _out[1].flush()


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop(seq: int, t_pub: float) -> None:
    _record(seq, t_pub, time.time())


@app.task(name="bench.sleep")  # type: ignore[untyped-decorator]
def sleep(seq: int, t_pub: float, seconds: float) -> None:
    t_start = time.time()
    time.sleep(seconds)
    _record(seq, t_pub, t_start)


# The two compare-and-set writes any database-backed run makes (start, finish), as the
# old pool makes them: plain psycopg2 on a connection held per process.
PG_START_BY_ID = """
UPDATE scans SET status = 'running', attempts = attempts + 1,
       started_at = clock_timestamp(), heartbeat_at = clock_timestamp(), worker_id = %s
 WHERE id = %s AND status = 'queued'
RETURNING attempts, providers_scanned, frameworks_scanned
"""
PG_FINISH_BY_ID = """
UPDATE scans SET status = 'completed', finished_at = clock_timestamp(), findings_count = 0
 WHERE id = %s AND status = 'running' AND attempts = %s
"""
_pg: tuple[int, Any] | None = None


def _pg_conn(dsn: str) -> Any:
    global _pg
    if _pg is None or _pg[0] != os.getpid():
        import psycopg2

        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        _pg = (os.getpid(), conn)
    return _pg[1]


@app.task(name="bench.two_writes")  # type: ignore[untyped-decorator]
def two_writes(seq: int, t_pub: float, dsn: str, prefix: str) -> None:
    """A no-op run that records itself: the start and finish CAS on row ``prefix + seq``."""
    t_start = time.time()
    scan_id = f"{prefix}{seq}"
    with _pg_conn(dsn).cursor() as cur:
        cur.execute(PG_START_BY_ID, (f"raw:{os.getpid()}", scan_id))
        row = cur.fetchone()
        if row is not None:
            cur.execute(PG_FINISH_BY_ID, (scan_id, row[0]))
    _record(seq, t_pub, t_start)
