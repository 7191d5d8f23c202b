"""Self-fencing under database trouble (issue 14 items 1, 2 and 9), against real PostgreSQL.

A small TCP proxy (tests/tcp_proxy.py) sits between the worker side and the
database and can silently stop forwarding: heartbeats then hang rather than
fail, which is the case a fence that waits for the call to return gets wrong.
Outage timings come from the settings below, kept short so the file stays quick;
every figure is printed (``FENCE …``) for the issue's notes.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scanqueue import Job, ScanContext, ScanResult
from scanqueue.config import Settings, normalize_database_url, self_fence_after_s
from scanqueue.db.rows import FinishedRun
from scanqueue.db.store import Store
from scanqueue.errors import ConfigError
from scanqueue.observe.observer import RunInfo
from scanqueue.runners.api import RunnerFunc
from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan
from scanqueue.worker.lease import LeaseKeeper
from tests.claimed import mark_dispatched
from tests.conftest import (
    Proc,
    all_finished,
    assert_no_overlaps,
    base_env,
    insert_rows,
    read_journal,
    scan_rows,
    start_bridge,
    start_worker,
    upgrade,
    wait_for,
)
from tests.integration.test_store import insert_claimed
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres]


def report(what: str, value: str) -> None:
    print(f"\nFENCE {what}: {value}")


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    p = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield p
    p.close()


@pytest.fixture
def proxied_store(pg_url: str, proxy: TcpProxy) -> Iterator[Store]:
    upgrade(pg_url)
    store = Store(normalize_database_url(proxy.url_for(pg_url)))
    yield store
    proxy.resume()
    store.dispose()


class Recorder:
    """An observer that writes down what it hears."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def started(self, run: RunInfo) -> None:
        self.calls.append(("started", run.attempt))

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None:
        if event_type == "scan.requeued":
            self.calls.append((event_type, payload.get("reason")))

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        self.calls.append(("finished", row.status))

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        self.calls.append(("discarded", run.attempt))

    def canceled(self, run: RunInfo, duration_s: float) -> None:
        self.calls.append(("canceled", run.attempt))


# -- configuration ------------------------------------------------------------------------


def _run_cooperative(
    store: Store, scan_id: str, *, wait_s: float, findings: int
) -> tuple[threading.Thread, list[Outcome], Recorder]:
    """Run ``scan_id`` in a thread with a runner that waits on its context, then returns
    ``findings``; return once the runner has been entered."""
    entered = threading.Event()

    def cooperative(job: Job, ctx: ScanContext) -> ScanResult:
        entered.set()
        ctx.wait(wait_s)
        return ScanResult(findings_count=findings)

    observer = Recorder()
    result: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: result.append(
            execute_scan(
                scan_id,
                store=store,
                runner=RunnerFunc(cooperative),
                settings=OUTAGE,
                observer=observer,
            )
        )
    )
    thread.start()
    assert entered.wait(10)
    return thread, result, observer


def test_defaults_fence_and_terminate_strictly_before_the_lease() -> None:
    s = Settings.from_env({})
    fence = self_fence_after_s(s.lease_s, s.cancel_grace_s)
    assert s.heartbeat_every_s <= fence and fence + s.cancel_grace_s < s.lease_s
    report("defaults", f"fence {fence:g}s + grace {s.cancel_grace_s:g}s < lease {s.lease_s:g}s")


@pytest.mark.parametrize(
    "env",
    [
        {"SCANQUEUE_LEASE_SECONDS": "10", "SCANQUEUE_CANCEL_GRACE_SECONDS": "10"},
        {"SCANQUEUE_LEASE_SECONDS": "10", "SCANQUEUE_CANCEL_GRACE_SECONDS": "30"},
        {"SCANQUEUE_LEASE_SECONDS": "12"},  # the default grace (10 s) no longer fits
    ],
)
def test_a_grace_that_leaves_no_fence_is_rejected_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    text = str(err.value)
    assert text.startswith("SCANQUEUE_CANCEL_GRACE_SECONDS: ") and "\n" not in text
    assert "SCANQUEUE_LEASE_SECONDS" in text


# -- the fence does not wait for a hung heartbeat -----------------------------------------

HUNG = ExecutionSettings(heartbeat_every_s=0.2, lease_s=3, cancel_grace_s=0.5)


def test_fence_fires_on_time_while_the_heartbeat_hangs_on_a_stalled_socket(
    proxied_store: Store, proxy: TcpProxy
) -> None:
    assert proxied_store._direct is not None
    proxied_store._direct.deadline_s = 30  # longer than the test: only the fence can act
    insert_claimed(proxied_store, "hang")
    started = proxied_store.start_run("hang", "w")
    assert started is not None
    ctx = ScanContext("hang", started.attempt)
    overdue: list[float] = []
    keeper = LeaseKeeper(
        proxied_store, ctx, HUNG, on_overdue=lambda c: overdue.append(time.monotonic())
    )
    keeper.start()
    time.sleep(0.5)  # a couple of good heartbeats first
    proxy.stall()
    t_stall = time.monotonic()
    try:
        assert ctx.wait(HUNG.lease_s)
        told = time.monotonic() - t_stall
        wait_for(lambda: overdue, HUNG.lease_s, what="termination after the grace")
    finally:
        keeper.stop()
        proxy.resume()
    assert keeper._run is not None
    # The lease runs from the last heartbeat the database took; the worker counts from
    # when that heartbeat was sent, which is no later.
    renewed = keeper._run.last_renewed
    ended = overdue[0] - renewed
    assert ctx.stop_reason is not None and "lease in doubt" in ctx.stop_reason
    assert told <= HUNG.fence_s + 0.3
    assert ended < HUNG.lease_s  # gone before the lease could pass to anyone else
    report(
        "hung heartbeat (lease 3 s, grace 0.5 s)",
        f"told to stop {told:.2f}s after the stall; terminated {ended:.2f}s after the last"
        f" renewal (lease {HUNG.lease_s:g}s)",
    )


def test_a_statement_on_a_stalled_connection_is_cut_at_its_deadline(
    proxied_store: Store, proxy: TcpProxy
) -> None:
    from scanqueue.errors import UnavailableError

    assert proxied_store._direct is not None
    proxied_store._direct.deadline_s = 1.0
    insert_claimed(proxied_store, "cut")
    started = proxied_store.start_run("cut", "w")
    assert started is not None
    proxy.stall()
    t0 = time.monotonic()
    with pytest.raises(UnavailableError):
        proxied_store.heartbeat("cut", started.attempt)
    took = time.monotonic() - t0
    assert 0.9 <= took < 3
    proxy.resume()
    assert proxied_store.heartbeat("cut", started.attempt)  # a fresh connection works
    report("client-side deadline 1 s", f"stalled heartbeat raised after {took:.2f}s")


# -- a run told to stop never completes -----------------------------------------------------

OUTAGE = ExecutionSettings(heartbeat_every_s=0.2, lease_s=4, cancel_grace_s=0.5)


def test_a_run_stopped_by_the_fence_is_handed_back_never_completed(
    proxied_store: Store, proxy: TcpProxy
) -> None:
    """The database is cut off longer than the fence, shorter than the lease."""
    insert_claimed(proxied_store, "doubt")
    thread, result, observer = _run_cooperative(
        proxied_store, "doubt", wait_s=30, findings=5
    )  # the runner's result would be a partial one
    time.sleep(0.3)
    proxy.stall()
    t0 = time.monotonic()
    outage = OUTAGE.fence_s + 0.4
    assert outage < OUTAGE.lease_s
    time.sleep(outage)
    proxy.resume()
    thread.join(20)
    assert result == [Outcome.REQUEUED]
    row = proxied_store.get("doubt")
    assert row.status == "queued" and row.findings_count == 0 and row.attempts == 1
    assert ("finished", "completed") not in observer.calls
    assert observer.calls[0] == ("started", 1) and observer.calls[-1] == ("discarded", 1)
    assert observer.calls[1][0] == "scan.requeued" and "lease in doubt" in observer.calls[1][1]
    assert len(observer.calls) == 3
    report(
        "outage past the fence, within the lease",
        f"handed back {time.monotonic() - t0:.2f}s after the cut",
    )


def test_a_run_stopped_while_the_database_stays_stalled_still_returns(
    proxied_store: Store, proxy: TcpProxy
) -> None:
    """No statement of the run waits for ever: the pool process is free again."""
    assert proxied_store._direct is not None
    proxied_store._direct.deadline_s = 1.0
    insert_claimed(proxied_store, "gone")
    thread, result, observer = _run_cooperative(proxied_store, "gone", wait_s=60, findings=5)
    proxy.stall()
    t0 = time.monotonic()
    thread.join(30)
    took = time.monotonic() - t0
    assert result == [Outcome.LOST]  # not handed back: the reaper re-queues it later
    assert observer.calls == [("started", 1), ("discarded", 1)]
    proxy.resume()
    # Left for the reaper, or handed back by a statement the stall had held and the
    # resumed network delivered (a compare-and-set either way); never completed.
    assert proxied_store.get("gone").status in ("running", "queued")
    report("database stalled for good", f"execute_scan returned {took:.2f}s after the stall")


def test_a_canceled_run_stays_canceled_and_is_counted_as_canceled(proxied_store: Store) -> None:
    insert_claimed(proxied_store, "cx")
    thread, result, observer = _run_cooperative(proxied_store, "cx", wait_s=30, findings=1)
    proxied_store.cancel("cx")
    thread.join(10)
    assert result == [Outcome.CANCELED] and proxied_store.get("cx").status == "canceled"
    assert observer.calls == [("started", 1), ("canceled", 1)]


def test_the_lease_keeper_is_stopped_when_the_runner_raises_a_base_exception(
    proxied_store: Store,
) -> None:
    from scanqueue.worker.lease import lease_thread

    insert_claimed(proxied_store, "exit")

    def leaves(job: Job, ctx: ScanContext) -> None:
        raise SystemExit(0)  # as a shutdown does inside a pool process

    with pytest.raises(SystemExit):
        execute_scan("exit", store=proxied_store, runner=RunnerFunc(leaves), settings=OUTAGE)
    assert not any(r.ctx.scan_id == "exit" for r in lease_thread()._runs)


def test_a_straggler_of_a_handed_back_run_cannot_touch_the_next_run(pg_url: str) -> None:
    """A graceful hand-back gives the attempt back; the worker id still fences."""
    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    insert_claimed(store, "hb")
    first = store.start_run("hb", "host:1:aa/11:x")
    assert first is not None and first.attempt == 1
    assert store.hand_back("host:1:aa") == ["hb"]
    assert store.get("hb").attempts == 0  # no crash budget spent
    assert store.start_run("hb", "host:2:bb/22:y") is None  # handed back: not claimed
    mark_dispatched(store, "hb")
    second = store.start_run("hb", "host:2:bb/22:y")
    assert second is not None and second.attempt == 1  # the number comes round again
    assert not store.heartbeat("hb", 1, worker_id="host:1:aa/11:x")
    assert store.finish_run("hb", 1, "completed", worker_id="host:1:aa/11:x") is None
    assert not store.hand_back_run("hb", 1, "host:1:aa/11:x")
    assert store.heartbeat("hb", 1, worker_id="host:2:bb/22:y")
    assert store.finish_run("hb", 1, "completed", worker_id="host:2:bb/22:y") is not None
    store.dispose()


# -- end to end: a worker cut off mid-run, another takes over, no overlap -------------------


@pytest.mark.slow
@pytest.mark.redis
def test_a_worker_whose_database_stalls_stops_before_another_runs_the_scan(
    pg_url: str, proxy: TcpProxy, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    timings = {
        "SCANQUEUE_LEASE_SECONDS": "6",
        "SCANQUEUE_CANCEL_GRACE_SECONDS": "1",
        "SCANQUEUE_RUNNER": "tests.runners:journal_runner",
        "SCANQUEUE_TEST_RUN_SECONDS": "12",
        "REDIS_URL": redis_url,
    }
    cut_off = base_env(proxy.url_for(pg_url), tmp_path, **timings)
    healthy = {**cut_off, "DATABASE_URL": pg_url}
    # The bridge (and so the reaper) talks to the database directly; the healthy worker
    # starts only once the victim runs the scan.
    start_bridge(procs, healthy, tmp_path)
    victim = start_worker(procs, cut_off, tmp_path, "--without-bridge", "--autoscale=1,1")
    insert_rows(pg_url, ["stall"])

    def starts() -> list[dict[str, Any]]:
        return [e for e in read_journal(tmp_path) if e["kind"] == "start"]

    wait_for(lambda: starts(), 30, what="the first run")
    first = starts()[0]
    assert first["pid"] in _pool_pids(victim)
    start_worker(procs, healthy, tmp_path, "--without-bridge", "--autoscale=1,1")
    proxy.stall()
    t0 = time.time()
    wait_for(lambda: len(starts()) >= 2, 40, interval=0.2, what="the re-run elsewhere")
    rerun_after = starts()[1]["t"] - t0
    proxy.resume()
    wait_for(lambda: all_finished(pg_url, 1), 40, interval=0.2, what="the scan to finish")
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    ends = [e for e in journal if e["kind"] == "end" and e["pid"] == first["pid"]]
    stopped_after = ends[0]["t"] - t0 if ends else float("nan")
    row = scan_rows(pg_url)["stall"]
    assert row["status"] == "completed" and row["attempts"] == 2
    report(
        "worker's database stalled mid-run (lease 6 s, grace 1 s)",
        f"first run stopped {stopped_after:.2f}s after the stall, re-run started "
        f"{rerun_after:.2f}s after it",
    )
    victim.proc.send_signal(signal.SIGTERM)


def _pool_pids(worker: Proc) -> set[int]:
    import subprocess

    out = subprocess.run(
        ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True, timeout=10
    ).stdout
    return {int(p) for p in out.split()}
