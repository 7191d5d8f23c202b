"""Where a pool process's cycle goes: inside a run, and between runs (PostgreSQL, c2).

Runs N no-op scans through a warmed-up ``--autoscale=2,2`` worker whose runner
times itself (``bench/cycle_runners.py``), then the like-for-like yardstick (raw
Celery making the two compare-and-set writes, ``bench.two_writes``) on the same
database, ROUNDS times.  For each it reports, per scan and per pool process:

- from the rows: ``run`` (``started_at`` → ``finished_at``) and ``gap`` (one
  run's ``finished_at`` → the same process's next ``started_at``): the cycle;
- scanqueue only, from the timers: milliseconds inside ``execute_scan`` (the start
  and finish statements, the observers, the lease registration, the rest) and
  between one ``execute_scan`` and the next (Celery's result and hand-off, and any
  wait for a message).

An experiment for the bound analysis in ``bench/README.md``.

    .venv/bin/python -m bench.pool_cycle              # 2 rounds of 4,000
    BENCH_CYCLE_ROUNDS=3 BENCH_CYCLE_N=6000 .venv/bin/python -m bench.pool_cycle
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.run import (
    Bench,
    RawCelery,
    bench_with_redis,
    db_throughput,
    raw_two_writes,
    start_scanqueue,
)


def cycle_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean run and gap in ms, per pool process (rows carry worker_id, started, finished)."""
    by_process: dict[Any, list[tuple[float, float]]] = {}
    for r in rows:
        by_process.setdefault(r["worker_id"], []).append((r["started"], r["finished"]))
    gaps: list[float] = []
    run_ms: list[float] = []
    for spans in by_process.values():
        spans.sort()
        run_ms += [(f - s) * 1000.0 for s, f in spans]
        gaps += [(s1 - f0) * 1000.0 for (_, f0), (s1, _) in itertools.pairwise(spans)]
    return {
        "run_ms": round(statistics.mean(run_ms), 3),
        "gap_ms": round(statistics.mean(gaps), 3),
        "gap_p50_ms": round(statistics.median(gaps), 3),
    }


def timers(directory: Path) -> dict[str, float]:
    """The pool processes' timers, summed, in ms per scan."""
    total: dict[str, float] = {}
    for path in directory.glob("*.json"):
        for key, value in json.loads(path.read_text()).items():
            total[key] = total.get(key, 0.0) + value
    scans = total.pop("scans", 0) or 1
    out = {key: round(value * 1000.0 / scans, 3) for key, value in total.items()}
    parts = ("start_run", "finish_run", "observers", "lease", "successor_send", "successor_answer")
    out["rest_of_execute"] = round(out["execute"] - sum(out.get(k, 0.0) for k in parts), 3)
    return out


def one_round(b: Bench, n: int) -> dict[str, Any]:
    db = b.new_db("postgresql")
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cycle-") as directory:
            worker = start_scanqueue(
                b, db, "2,2", runner="bench.cycle_runners:noop", BENCH_CYCLE_DIR=directory
            )
            run = db_throughput(db, n, worker, timeout_s=n / 15.0)
            b.stop(worker)
            assert run["exactly_once"]["ok"], run["exactly_once"]
            out["scanqueue"] = {
                "per_s": run["per_s"],
                **cycle_of(db.lifecycle("tp-")),
                "timers_ms_per_scan": timers(Path(directory)),
            }
        raw = RawCelery(b, "postgresql", "2,2")
        yardstick = raw_two_writes(raw, db, n, n / 15.0)
        b.stop(raw.proc)
        out["two_writes"] = {"per_s": yardstick["per_s"], **cycle_of(db.lifecycle("rw-"))}
    finally:
        b.drop_db(db)
    return out


def main() -> None:
    rounds = int(os.environ.get("BENCH_CYCLE_ROUNDS", "2"))
    n = int(os.environ.get("BENCH_CYCLE_N", "4000"))
    b = bench_with_redis()
    results = []
    try:
        for i in range(rounds):
            results.append(one_round(b, n))
            print(f"round {i + 1}: {json.dumps(results[-1])}", flush=True)
    finally:
        b.cleanup()
    print(json.dumps({"n": n, "rounds": results}, indent=2))


if __name__ == "__main__":
    main()
