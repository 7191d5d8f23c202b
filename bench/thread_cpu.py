"""CPU a scan by thread, in the worker's processes: where a no-op run's CPU goes.

Runs N no-op scans (PostgreSQL + Redis, ``--autoscale=2,2``, embedded bridge) as in
``bench.run``'s throughput phase, ROUNDS times, each from each source tree given
(``--tree LABEL=DIR``; default this one), interleaved, and reads every thread's CPU
time from ``/proc`` before and after the burst.  Prints, per tree, the median CPU
ms a scan of each (process role, thread name): ``main`` is the worker's main
process (the consumer and the embedded bridge's threads), ``pool`` the pool
processes summed.  Thread CPU is what the kernel charged that thread, so it says
what a part costs without the noise of throughput on a shared machine.

    .venv/bin/python -m bench.thread_cpu --n 4000 --rounds 3
    .venv/bin/python -m bench.thread_cpu --tree new=. --tree base=/tmp/base
    .venv/bin/python -m bench.thread_cpu --yardstick   # also raw Celery's two CAS writes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path

from bench.harness import CpuSplit
from bench.run import (
    Bench,
    RawCelery,
    bench_with_redis,
    db_throughput,
    raw_two_writes,
    start_scanqueue,
)

TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _threads(main_pid: int) -> Iterator[tuple[str, int, Path]]:
    """(role, pid, /proc task directory) of every thread of the worker's main process
    (``main``) and of its children (``pool``)."""
    for pid, role in [(main_pid, "main")] + [(c, "pool") for c in _children(main_pid)]:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            yield role, pid, task


def thread_cpu(main_pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds by (role, thread name) over the worker's main process and its children."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for role, pid, task in _threads(main_pid):
        try:
            name = (task / "comm").read_text().strip()
            if task.name == str(pid):
                name = "MainThread"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime and stime are fields 14 and 15 of stat: 12 and 13 after the ")".
        out[(role, name)] += (int(fields[11]) + int(fields[12])) / TICKS
    return dict(out)


def wakeups(main_pid: int) -> dict[str, int]:
    """Context switches of the worker's threads so far, by role: voluntary ones (a
    thread that waited and was woken) and involuntary ones (preempted)."""
    out: collections.Counter[str] = collections.Counter()
    for role, _pid, task in _threads(main_pid):
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                key, value = line.split(":")
                kind = "woken" if key.startswith("voluntary") else "preempted"
                out[f"switches/{role}/{kind}"] += int(value)
    return dict(out)


def switches_per_scan(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    return {k: round((v - before.get(k, 0)) / n, 3) for k, v in after.items()}


def per_scan(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], n: int, per_s: float
) -> dict[str, float]:
    """CPU ms a scan of each (role, thread) between two readings, and their total."""
    got = {
        f"{role}/{name}": round((spent - before.get((role, name), 0.0)) * 1000 / n, 4)
        for (role, name), spent in after.items()
    }
    got["total"] = round(sum(got.values()), 4)
    got["per_s"] = per_s
    return got


def one_run(b: Bench, n: int, source: str) -> dict[str, float]:
    db = b.new_db("postgresql")
    try:
        extra = {"PYTHONPATH": source} if source else {}
        worker = start_scanqueue(b, db, "2,2", runner="bench.named_threads:noop", **extra)
        before, switched = thread_cpu(worker.pid), wakeups(worker.pid)
        servers = CpuSplit(worker.pid)
        run = db_throughput(db, n, worker, timeout_s=n / 20.0)
        after = thread_cpu(worker.pid)
        switches = switches_per_scan(switched, wakeups(worker.pid), n)
        split = servers.ms_per_item(n)
        b.stop(worker)
    finally:
        b.drop_db(db)
    assert run["exactly_once"]["ok"], run["exactly_once"]
    return with_servers(per_scan(before, after, n, float(run["per_s"])), split) | switches


def yardstick_run(b: Bench, n: int) -> dict[str, float]:
    """The like-for-like yardstick (raw Celery whose task makes the two CAS writes)."""
    raw = RawCelery(b, "postgresql", "2,2")
    db = b.new_db("postgresql")
    try:
        before, switched = thread_cpu(raw.proc.pid), wakeups(raw.proc.pid)
        servers = CpuSplit(raw.proc.pid)
        run = raw_two_writes(raw, db, n, n / 20.0)
        after = thread_cpu(raw.proc.pid)
        switches = switches_per_scan(switched, wakeups(raw.proc.pid), n)
        split = servers.ms_per_item(n)
    finally:
        b.drop_db(db)
        b.stop(raw.proc)
    assert run["exactly_once"]["ok"], run["exactly_once"]
    return with_servers(per_scan(before, after, n, float(run["per_s"])), split) | switches


def with_servers(got: dict[str, float], split: dict[str, float]) -> dict[str, float]:
    """A run's thread figures with the servers' CPU ms a scan beside them (``sys/``:
    every PostgreSQL and Redis process, and the whole machine's busy time)."""
    for key in ("postgres", "redis", "machine", "other"):
        got[f"sys/{key}"] = split.get(key, 0.0)
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="LABEL=DIR (repeatable)")
    parser.add_argument(
        "--yardstick", action="store_true", help="also raw Celery with the two CAS writes"
    )
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", ""]]
    if args.yardstick:
        trees.append(["two_writes", "<yardstick>"])
    b = bench_with_redis()
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    try:
        for i in range(args.rounds):
            order = trees if i % 2 == 0 else list(reversed(trees))
            for label, source in order:
                if source == "<yardstick>":
                    got = yardstick_run(b, args.n)
                else:
                    got = one_run(b, args.n, str(Path(source).resolve()) if source else "")
                runs[label].append(got)
                total = got["total"]
                print(f"round {i + 1} {label}: {got['per_s']}/s, {total} ms a scan", flush=True)
    finally:
        b.cleanup()
    medians = {
        label: {
            k: round(statistics.median(r.get(k, 0.0) for r in rs), 4)
            for k in sorted({k for r in rs for k in r})
        }
        for label, rs in runs.items()
    }
    out: dict[str, object] = {"n": args.n, "rounds": args.rounds, "median_ms_a_scan": medians}
    if len(trees) > 1:
        # Each tree's figure over the first tree's, round by round: neighbouring runs
        # share the machine's state, so these move less than the medians.
        first = trees[0][0]
        out["by_round_over_" + first] = {
            label: {
                key: [
                    round(r.get(key, 0.0) / f[key], 3) if f.get(key) else None
                    for r, f in zip(runs[label], runs[first], strict=True)
                ]
                for key in (
                    "total",
                    "pool/MainThread",
                    "main/MainThread",
                    "sys/postgres",
                    "sys/machine",
                    "per_s",
                )
            }
            for label, _ in trees[1:]
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
