"""What each part of a no-op scan costs in throughput (PostgreSQL, concurrency 2).

Runs, ROUNDS times and interleaved: raw Celery, scanqueue as shipped, and scanqueue
with events, metrics, the lease keeper, or all three switched off
(``bench/ablation_runners.py``), or on a database with ``synchronous_commit = off``
(commits do not wait for the WAL flush; the statements are otherwise unchanged), or
with its events in the ``scanqueue_events`` table instead of the Redis stream
(``table_events``: no ``REDIS_URL``, Redis as the broker only).  Each round also
runs the like-for-like yardstick, raw Celery whose task makes a run's two
compare-and-set writes (``bench.two_writes``; ``BENCH_AB_TWO_WRITES=0`` skips it),
and reports every arm against it.
Each run is N no-op scans through a warmed-up worker, as in ``bench.run``'s
throughput phase.  Prints each run and the medians as ratios against raw Celery,
and each arm's median CPU per scan (worker tree, PostgreSQL, whole machine), which
moves less than throughput on a shared machine.
An experiment for the bound analysis in ``bench/README.md``.

With ``BENCH_AB_BASE=DIR`` (a source tree of another commit, e.g. from ``git
archive``), each arm also runs from that tree as ``ARM@base``, interleaved with
this tree's: a before/after in one run.  Several trees: ``LABEL=DIR,LABEL=DIR``
(arms ``ARM@LABEL``).

    .venv/bin/python -m bench.ablation                  # every arm, 3 rounds of 4,000
    BENCH_ABLATION_ARMS=shipped,no_events BENCH_AB_ROUNDS=5 .venv/bin/python -m bench.ablation
    BENCH_ABLATION_ARMS=shipped,sync_commit_off .venv/bin/python -m bench.ablation
    BENCH_AB_BASE=/tmp/old BENCH_ABLATION_ARMS=table_events .venv/bin/python -m bench.ablation
    BENCH_ABLATION_ARMS=shipped,no_wake,unbounded_window .venv/bin/python -m bench.ablation
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg2

from bench.harness import psycopg_dsn
from bench.run import (
    Bench,
    RawCelery,
    bench_with_redis,
    db_throughput,
    raw_two_writes,
    start_scanqueue,
)


@dataclass(frozen=True)
class Arm:
    ablate: str = ""  # BENCH_ABLATE: the parts switched off
    synchronous_commit: str = "on"  # the benchmark database's setting
    events_in_table: bool = False  # no REDIS_URL: events in scanqueue_events
    source: str = ""  # another source tree to run scanqueue from (BENCH_AB_BASE)
    window: str = ""  # SCANQUEUE_DISPATCH_WINDOW; "" = the default (twice the slots, at least 4)


ARMS = {
    "shipped": Arm(),
    "no_events": Arm("events"),
    "no_metrics": Arm("metrics"),
    "no_lease": Arm("lease"),
    "none": Arm("events,metrics,lease"),
    "sync_commit_off": Arm(synchronous_commit="off"),
    "table_events": Arm(events_in_table=True),
    "no_wake": Arm("wake"),
    "unbounded_window": Arm(window=str(10**9)),
}


def set_synchronous_commit(url: str, value: str) -> None:
    dsn = psycopg_dsn(url)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{dsn.rsplit("/", 1)[-1]}" SET synchronous_commit = {value}')
    conn.close()


def scanqueue_run(b: Bench, n: int, arm: Arm) -> dict[str, float]:
    db = b.new_db("postgresql")
    try:
        if arm.synchronous_commit != "on":
            set_synchronous_commit(db.url, arm.synchronous_commit)
        extra = {"BENCH_ABLATE": arm.ablate}
        if arm.events_in_table:
            assert b.redis is not None
            extra.update(REDIS_URL="", CELERY_BROKER_URL=b.redis.url)
        if arm.source:
            extra["PYTHONPATH"] = arm.source
        if arm.window:
            extra["SCANQUEUE_DISPATCH_WINDOW"] = arm.window
        worker = start_scanqueue(b, db, "2,2", runner="bench.ablation_runners:noop", **extra)
        run = db_throughput(db, n, worker, timeout_s=n / 20.0)
        b.stop(worker)
    finally:
        b.drop_db(db)
    assert run["exactly_once"]["ok"], run["exactly_once"]
    split = run["cpu_split_ms_per_scan"]
    return {
        "per_s": float(run["per_s"]),
        "worker_ms": float(split["worker"]),
        "postgres_ms": float(split["postgres"]),
        "machine_ms": float(split["machine"]),
    }


def main() -> None:
    rounds = int(os.environ.get("BENCH_AB_ROUNDS", "3"))
    n = int(os.environ.get("BENCH_AB_N", "4000"))
    b = bench_with_redis()
    chosen = [a for a in os.environ.get("BENCH_ABLATION_ARMS", ",".join(ARMS)).split(",") if a]
    arms_by_name = {name: ARMS[name] for name in chosen}
    trees = [t for t in os.environ.get("BENCH_AB_BASE", "").split(",") if t]
    labels = [t.partition("=")[0] if "=" in t else "base" for t in trees]
    for label, tree in zip(labels, trees, strict=True):
        for name in chosen:
            source = str(Path(tree.partition("=")[2] if "=" in tree else tree).resolve())
            arms_by_name[f"{name}@{label}"] = replace(ARMS[name], source=source)
    chosen = [n for name in chosen for n in (name, *(f"{name}@{label}" for label in labels))]
    # The like-for-like yardstick (bench.run's raw_celery_c2_two_writes), each round.
    two_writes = os.environ.get("BENCH_AB_TWO_WRITES", "1") != "0"
    runs: dict[str, list[float]] = {
        "raw": [],
        **({"two_writes": []} if two_writes else {}),
        **{arm: [] for arm in chosen},
    }
    # CPU per scan (ms): steadier than throughput on a shared machine.
    cpu: dict[str, dict[str, list[float]]] = {arm: {} for arm in chosen}
    try:
        for i in range(rounds):
            raw = RawCelery(b, "postgresql", "2,2")
            runs["raw"].append(raw.throughput(n, n / 20.0)["per_s"])
            if two_writes:
                db = b.new_db("postgresql")
                try:
                    yardstick = raw_two_writes(raw, db, n, n / 20.0)
                finally:
                    b.drop_db(db)
                assert yardstick["exactly_once"]["ok"], yardstick["exactly_once"]
                runs["two_writes"].append(yardstick["per_s"])
            b.stop(raw.proc)
            arms = chosen if i % 2 == 0 else list(reversed(chosen))
            for arm in arms:
                got = scanqueue_run(b, n, arms_by_name[arm])
                runs[arm].append(got.pop("per_s"))
                for k, v in got.items():
                    cpu[arm].setdefault(k, []).append(v)
            print(
                f"round {i + 1}: " + ", ".join(f"{k} {v[-1]}/s" for k, v in runs.items()),
                flush=True,
            )
    finally:
        b.cleanup()
    med = {arm: statistics.median(v) for arm, v in runs.items()}
    print(
        json.dumps(
            {
                "n": n,
                "runs": runs,
                "median_per_s": med,
                "vs_raw": {arm: round(v / med["raw"], 3) for arm, v in med.items()},
                **(
                    {
                        "vs_two_writes": {
                            arm: round(v / med["two_writes"], 3) for arm, v in med.items()
                        },
                        # Round by round (each scanqueue run against its round's yardstick).
                        "vs_two_writes_by_round": {
                            arm: [
                                round(x / y, 3)
                                for x, y in zip(runs[arm], runs["two_writes"], strict=True)
                            ]
                            for arm in chosen
                        },
                    }
                    if two_writes
                    else {}
                ),
                "median_cpu_ms_per_scan": {
                    arm: {k: round(statistics.median(v), 3) for k, v in parts.items()}
                    for arm, parts in cpu.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
