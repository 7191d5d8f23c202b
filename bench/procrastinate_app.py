"""Procrastinate, the closest Python peer on PostgreSQL: a no-op task for ``bench.run``.

Optional: the throughput phase measures it only when ``procrastinate`` is
installed (``pip install procrastinate``).  Its jobs live in PostgreSQL only (no
broker), so it is compared on the PostgreSQL backend.

    BENCH_PG_DSN=postgresql://... python -m bench.procrastinate_app schema
    BENCH_PG_DSN=postgresql://... python -m bench.procrastinate_app worker 2
"""

from __future__ import annotations

import os
import sys

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PG_DSN", "")))


@app.task(name="bench.noop")
def noop(seq: int) -> None:
    """Does nothing: the figure is the queue's own cost."""


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] == "schema":
        with app.open():
            app.schema_manager.apply_schema()
        return 0
    if len(argv) >= 3 and argv[1] == "worker":
        app.run_worker(concurrency=int(argv[2]), wait=True, listen_notify=True)
        return 0
    print("usage: python -m bench.procrastinate_app schema | worker CONCURRENCY", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
