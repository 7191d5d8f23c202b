"""The queue-depth autoscaler: the sampler, the Celery class with a fake pool, and real
workers growing under a backlog of slow scans and shrinking back.  The pure decision's
rules are tested in tests/unit/test_autoscale_decide.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from scanqueue.config import normalize_database_url
from scanqueue.errors import ConfigError
from scanqueue.worker.autoscale import (
    DEPTH_MAX_AGE_S,
    AutoscaleConfig,
    BacklogSampler,
    QueueDepthAutoscaler,
    Sample,
    ScaleState,
)
from tests.conftest import REPO, Proc, base_env, free_port, start_worker, upgrade, wait_for

# -- sampling and configuration ---------------------------------------------------------


def test_sampler_counts_a_failed_or_stale_sample_as_zero_not_the_last_value() -> None:
    values: list[Any] = [5, RuntimeError("broker down"), None, 3]

    def read(max_age_s: float) -> int | None:
        v = values.pop(0)
        if isinstance(v, Exception):
            raise v
        return v  # type: ignore[no-any-return]

    sampler = BacklogSampler(read, every_s=0.1, what="broker")
    assert sampler.latest(time.monotonic()) == 0  # nothing sampled yet
    sampler.sample_once()
    assert sampler.latest(time.monotonic()) == 5
    assert sampler.latest(time.monotonic() + 10) == 0  # stale
    sampler.sample_once()
    assert sampler.latest(time.monotonic()) == 0  # failed
    sampler.sample_once()
    assert sampler.latest(time.monotonic()) == 0  # missing queue
    sampler.sample_once()
    assert sampler.latest(time.monotonic()) == 3


def test_sampler_thread_samples_in_the_background() -> None:
    calls: list[float] = []

    def read(max_age_s: float) -> int:
        calls.append(time.monotonic())
        return len(calls)

    sampler = BacklogSampler(read, every_s=0.05, what="database")
    sampler.start()
    try:
        wait_for(lambda: len(calls) >= 3, 5, what="three samples")
    finally:
        sampler.stop()
    assert sampler.latest(time.monotonic()) >= 3


def test_a_requested_sample_comes_at_once_and_counts_afresh() -> None:
    ages: list[float] = []
    sampled = []

    def read(max_age_s: float) -> int:
        ages.append(max_age_s)
        return 7

    sampler = BacklogSampler(read, every_s=30, what="database", on_sample=lambda: sampled.append(1))
    sampler.start()
    try:
        wait_for(lambda: len(ages) == 1, 5, what="the first sample")
        assert ages == [DEPTH_MAX_AGE_S]  # scheduled: may share the bridge's count
        t0 = time.monotonic()
        assert sampler.request(t0, older_than_s=60)  # no fresh count yet
        wait_for(lambda: len(ages) == 2, 5, interval=0.01, what="the requested sample")
        assert time.monotonic() - t0 < 1  # not the 30 s period
        assert ages[1] == 0.0  # a fresh count, not one the bridge made a second ago
        assert sampler.latest(time.monotonic()) == 7 and len(sampled) == 2
        assert not sampler.request(time.monotonic(), older_than_s=60)  # fresh enough
        assert sampler.request(time.monotonic(), older_than_s=0)
        wait_for(lambda: len(ages) == 3, 5, interval=0.01, what="another requested sample")
    finally:
        sampler.stop()


@pytest.mark.redis
def test_an_empty_or_missing_redis_queue_reads_as_zero(redis_url: str) -> None:
    from celery import Celery
    from kombu.connection import Connection

    from scanqueue.dispatch.service import make_broker_depth
    from scanqueue.worker.app import QUEUE

    app = Celery("depth-test", broker=redis_url)
    depth = make_broker_depth(app, QUEUE)
    assert depth() == 0  # Redis has no such list: a 404 channel error
    with Connection(redis_url) as conn:  # type: ignore[no-untyped-call]
        queue = conn.SimpleQueue(QUEUE)
        queue.put({"scan": "x"})
        queue.put({"scan": "y"})
        assert depth() == 2
        queue.get(timeout=5).ack()
        queue.get(timeout=5).ack()
        queue.close()
    assert depth() == 0  # emptied: Redis deleted the list again


def test_config_defaults_and_env() -> None:
    assert AutoscaleConfig.from_env({}) == AutoscaleConfig("db", 0, 1.0, 1.0, 0.25, 4.0)
    config = AutoscaleConfig.from_env(
        {
            "SCANQUEUE_AUTOSCALE_SOURCE": "Broker",
            "SCANQUEUE_AUTOSCALE_THRESHOLD": "4",
            "SCANQUEUE_AUTOSCALE_GROW_AFTER": "0.5",
            "SCANQUEUE_AUTOSCALE_SAMPLE_EVERY": "2",
            "SCANQUEUE_AUTOSCALE_TICK": "0.5",
            "SCANQUEUE_AUTOSCALE_SURGE": "0",
        }
    )
    assert config == AutoscaleConfig("broker", 4, 0.5, 2.0, 0.5, 0.0)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SCANQUEUE_AUTOSCALE_SOURCE", "rabbit"),
        ("SCANQUEUE_AUTOSCALE_THRESHOLD", "1.5"),
        ("SCANQUEUE_AUTOSCALE_THRESHOLD", "-1"),
        ("SCANQUEUE_AUTOSCALE_GROW_AFTER", "soon"),
        ("SCANQUEUE_AUTOSCALE_TICK", "0"),
        ("SCANQUEUE_AUTOSCALE_SAMPLE_EVERY", "nan"),
        ("SCANQUEUE_AUTOSCALE_SURGE", "-1"),
        ("SCANQUEUE_AUTOSCALE_SURGE", "many"),
    ],
)
def test_config_rejects_bad_values_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        AutoscaleConfig.from_env({name: raw})


# -- the Celery class, with a fake pool ---------------------------------------------------


class FakePool:
    def __init__(self, processes: int) -> None:
        self.num_processes = processes
        self.calls: list[tuple[str, int]] = []
        self.maintained = 0

    def grow(self, n: int) -> None:
        self.num_processes += n
        self.calls.append(("grow", n))

    def shrink(self, n: int) -> None:
        self.num_processes -= n
        self.calls.append(("shrink", n))

    def maintain_pool(self) -> None:
        self.maintained += 1


class FakeRequest:
    """Celery keeps requests in weak sets; a plain object() cannot be weakly referenced."""


@pytest.fixture
def reserved() -> Iterator[set[Any]]:
    from celery.worker import state

    added: set[Any] = set()
    yield added
    for req in added:
        state.reserved_requests.discard(req)
        state.active_requests.discard(req)


def test_celery_class_grows_from_the_sampled_backlog_and_shrinks_after_keepalive(
    reserved: set[Any],
) -> None:
    from celery.worker import state

    backlog = {"n": 8}
    pool = FakePool(1)
    config = AutoscaleConfig(grow_after_s=0.2, sample_every_s=0.05, tick_s=0.05)
    scaler = QueueDepthAutoscaler(
        pool,
        4,
        1,
        worker=None,
        keepalive=0.5,
        config=config,
        read_backlog=lambda _age: backlog["n"],
    )
    assert scaler.keepalive == 0.05  # Celery's tick; the idle keepalive is separate
    assert scaler.idle_keepalive_s == 0.5
    try:
        request = FakeRequest()
        reserved.add(request)
        state.reserved_requests.add(request)
        state.active_requests.add(request)
        wait_for(lambda: scaler.maybe_scale() or pool.num_processes == 4, 5, what="grow to 4")
        assert pool.calls == [("grow", 3)]
        assert "backlog 8" in (scaler.last_decision.reason if scaler.last_decision else "")

        backlog["n"] = 0
        state.reserved_requests.discard(request)
        state.active_requests.discard(request)
        t0 = time.monotonic()
        wait_for(lambda: scaler.maybe_scale() or pool.num_processes == 1, 5, what="shrink to 1")
        assert time.monotonic() - t0 >= 0.5
        assert pool.calls == [("grow", 3), ("shrink", 3)]
        info = scaler.info()
        assert info["source"] == "db" and info["min"] == 1 and info["max"] == 4
    finally:
        scaler.stop()


def test_celery_class_drops_a_shrink_when_a_scan_arrived_after_the_sample() -> None:
    # Without the event loop the consumer thread may hand a scan over between the
    # sample and the shrink (celery#7266).
    pool = FakePool(3)
    config = AutoscaleConfig(sample_every_s=0.05, tick_s=0.05)
    scaler = QueueDepthAutoscaler(
        pool, 3, 1, keepalive=0.1, config=config, read_backlog=lambda _age: 0
    )
    try:
        before = ScaleState(surplus_since=time.monotonic() - 10, needed_peak=1)
        scaler.scale_state = before
        real_sample = scaler.sample

        def racing_sample(now: float) -> Sample:
            taken = real_sample(now)
            scaler._last_task_received = time.monotonic()
            return taken

        scaler.sample = racing_sample  # type: ignore[method-assign]
        assert not scaler._maybe_scale()
        assert pool.calls == [] and scaler.scale_state == before
        scaler.sample = real_sample  # type: ignore[method-assign]
        assert not scaler._maybe_scale()  # within the receive guard now
        scaler._last_task_received = time.monotonic() - 10
        assert scaler._maybe_scale() and pool.calls == [("shrink", 2)]
    finally:
        scaler.stop()


def _hold(reserved: set[Any], n: int) -> None:
    """``n`` requests this worker holds, every one accepted by a process."""
    from celery.worker import state

    for _ in range(n):
        req = FakeRequest()
        reserved.add(req)
        state.reserved_requests.add(req)
        state.active_requests.add(req)


def test_celery_class_samples_at_once_when_scans_wait_and_grows_at_once_on_a_burst(
    reserved: set[Any],
) -> None:
    # Sampling period and grow_after of 30 s: growing within a second can only be the
    # requested sample and the surge rule.
    backlog = {"n": 0}
    ages: list[float] = []

    def read(max_age_s: float) -> int:
        ages.append(max_age_s)
        return backlog["n"]

    pool = FakePool(1)
    config = AutoscaleConfig(grow_after_s=30, sample_every_s=30, tick_s=0.05)
    scaler = QueueDepthAutoscaler(pool, 4, 1, keepalive=30, config=config, read_backlog=read)
    try:
        scaler.maybe_scale()
        wait_for(lambda: len(ages) == 1, 5, what="the first sample")
        _hold(reserved, 1)  # busy, nothing waiting here: no extra samples
        for _ in range(5):
            scaler.maybe_scale()
        time.sleep(0.3)
        assert len(ages) == 1 and pool.calls == []

        backlog["n"] = 20
        _hold(reserved, 1)  # a second scan this worker holds and cannot run yet
        t0 = time.monotonic()
        wait_for(
            lambda: scaler.maybe_scale() or pool.num_processes == 4,
            5,
            interval=0.02,
            what="grow to 4",
        )
        assert time.monotonic() - t0 < 1
        assert pool.calls == [("grow", 3)]
        assert 0.0 in ages[1:]  # the requested, fresh count
        assert scaler.last_decision is not None
        assert "4x or more the 1 processes" in scaler.last_decision.reason
    finally:
        scaler.stop()


def test_celery_class_thread_decides_right_after_a_sample(reserved: set[Any]) -> None:
    # Without an event loop (the SQLite broker) the autoscaler is its own thread: a
    # sample that shows a burst is acted on at once, not at the next 5 s tick.
    pool = FakePool(1)
    config = AutoscaleConfig(grow_after_s=30, sample_every_s=30, tick_s=5)
    scaler = QueueDepthAutoscaler(
        pool, 4, 1, keepalive=30, config=config, read_backlog=lambda _age: 20
    )
    _hold(reserved, 2)
    t0 = time.monotonic()
    scaler.start()
    try:
        wait_for(lambda: pool.num_processes == 4, 5, interval=0.02, what="grow to 4")
        assert time.monotonic() - t0 < 1
        assert pool.calls == [("grow", 3)] and pool.maintained == 1
    finally:
        t1 = time.monotonic()
        scaler.stop()
    assert time.monotonic() - t1 < 2 and not scaler.is_alive()  # stop does not wait a tick


@pytest.mark.parametrize("blocking", [True, False])
def test_the_blocking_pool_is_left_to_its_own_supervisor_after_growing(
    reserved: set[Any], blocking: bool
) -> None:
    # billiard's blocking pool starts new processes from its supervisor thread;
    # maintaining it from the autoscaler thread as well raced with that.
    from celery.worker import state

    pool = FakePool(1)
    pool._pool = type("BilliardPool", (), {"threads": blocking})()  # type: ignore[attr-defined]
    scaler = QueueDepthAutoscaler(
        pool,
        4,
        1,
        keepalive=30,
        config=AutoscaleConfig(grow_after_s=0),
        read_backlog=lambda _age: 10,
    )
    try:
        scaler._ensure_sampler().sample_once()
        req = FakeRequest()
        reserved.add(req)
        state.reserved_requests.add(req)
        state.active_requests.add(req)
        scaler.maybe_scale()
        assert pool.calls == [("grow", 3)]
        assert pool.maintained == (0 if blocking else 1)
    finally:
        scaler.stop()


def _probe(scenario: str, **env: str) -> dict[str, Any]:
    # A real billiard pool, in a fresh interpreter: forked from this test process it
    # would inherit locks held by other tests' threads and could hang on exit.
    done = subprocess.run(
        [sys.executable, "-m", "tests.billiard_probe", scenario],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_two_quick_shrinks_end_two_live_processes_not_the_same_one_twice() -> None:
    # billiard's Pool.shrink picks a process it already told to end while that one
    # is still in its exit path (about a second): the second shrink is then lost and
    # a live process stays that the pool no longer counts.
    seen = _probe("two_quick_shrinks")
    assert seen == {
        "ended": [1, 1],
        "counted_after_two": 1,
        "exit_codes": [0, 0],  # left cleanly: no "exited with exitcode" error line
        "left": 1,
        "still_runs_jobs": True,
    }


def test_a_shrink_never_ends_a_process_holding_a_job() -> None:
    seen = _probe("busy_process_kept")
    assert seen == {"ended": 1, "busy_alive": True, "job_finished": True}


def test_blocking_pool_returns_to_one_every_time() -> None:
    # Signalled instead, a process waiting for the shared queue lock stayed until the
    # next job whenever the signal landed on its other thread: 8 runs of this probe
    # with SIGTERM failed at cycles 1-6.  A leave job cannot get stuck that way.
    seen = _probe("repeated_shrinks", CYCLES="8")
    assert seen["cycles"] == 8 and seen["counted"] == 1
    assert seen["slowest_s"] < 5


def test_worker_autoscales_between_the_settings_without_the_option() -> None:
    from celery.bin.worker import worker

    from scanqueue.worker.app import settings

    (param,) = [p for p in worker.params if p.name == "autoscale"]
    assert param.default == f"{settings.max_concurrency},{settings.concurrency}"


def test_celery_class_worker_setting_points_here() -> None:
    from scanqueue.worker.app import app

    assert app.conf.worker_autoscaler == "scanqueue.worker.autoscale:QueueDepthAutoscaler"


# -- real workers -------------------------------------------------------------------------


def _pool_children(pid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            count += 1
    return count


def _insert(url: str, ids: list[str]) -> None:
    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " VALUES (:id, 'queued', '[\"aws\"]', '[]')"
            ),
            [{"id": i} for i in ids],
        )
    engine.dispose()


def _statuses(url: str) -> list[tuple[str, int]]:
    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        found = [
            (r.status, r.attempts) for r in conn.execute(text("SELECT status, attempts FROM scans"))
        ]
    engine.dispose()
    return found


@pytest.fixture(params=["postgresql+redis", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scans.db'}", {}
    return request.getfixturevalue("pg_url"), {"REDIS_URL": request.getfixturevalue("redis_url")}


# The sustained period in the real-worker test: growing sooner than this after the
# backlog appears can only be the surge rule.
E2E_GROW_AFTER_S = 10
# Bound on growing 1 -> 4 after 12 scans appear behind a busy process: the bridge's
# claim and publish, the broker, a requested sample, a decision and three forks.
GROW_AT_ONCE_BOUND_S = 3.0


@pytest.mark.slow
def test_worker_grows_at_once_under_a_large_backlog_and_returns_to_the_minimum(
    backend: tuple[str, dict[str, str]], tmp_path: Path, procs: list[Proc]
) -> None:
    from tests.integration.test_metrics import try_scrape, value

    url, extra = backend
    upgrade(url)
    port = free_port()
    env = base_env(
        url,
        tmp_path,
        SCANQUEUE_RUNNER="tests.runners:journal_runner",
        SCANQUEUE_TEST_RUN_SECONDS="3",
        SCANQUEUE_CONCURRENCY="1",
        SCANQUEUE_MAX_CONCURRENCY="4",
        SCANQUEUE_AUTOSCALE_GROW_AFTER=str(E2E_GROW_AFTER_S),
        SCANQUEUE_METRICS_PORT=str(port),
        AUTOSCALE_KEEPALIVE="2",
        **extra,
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=4,1")
    assert "{min=1, max=4}" in worker.output()
    wait_for(lambda: _pool_children(worker.pid) == 1, 10, what="one pool process at rest")

    # A small queue (one scan running, one waiting: under 4x the one process) waits
    # the sustained period: no growth meanwhile.
    _insert(url, [f"s-{uuid.uuid4().hex[:8]}" for _ in range(2)])
    wait_for(
        lambda: sorted(s for s, _ in _statuses(url)) == ["queued", "running"],
        10,
        interval=0.05,
        what="one running, one waiting",
    )
    watched_until = time.monotonic() + 2.5
    while time.monotonic() < watched_until:
        assert _pool_children(worker.pid) == 1
        time.sleep(0.1)

    # A large backlog (13 waiting) grows the pool to MAX at once.
    n = 12
    t0 = time.monotonic()
    _insert(url, [f"a-{uuid.uuid4().hex[:8]}" for _ in range(n)])
    wait_for(lambda: _pool_children(worker.pid) == 4, 20, interval=0.05, what="grow to 4")
    grew_s = time.monotonic() - t0
    assert grew_s < GROW_AT_ONCE_BOUND_S
    wait_for(  # the gauge is refreshed every second
        lambda: value(try_scrape(port), "scanqueue_worker_pool_processes") == 4, 5, what="gauge 4"
    )

    wait_for(
        lambda: all(s == "completed" for s, _ in _statuses(url)), 60, interval=0.2, what="drained"
    )
    t1 = time.monotonic()
    drained_s = t1 - t0
    wait_for(lambda: _pool_children(worker.pid) == 1, 60, interval=0.1, what="back to 1")
    shrank_s = time.monotonic() - t1
    time.sleep(2)  # and it stays there: nothing ended was counted twice or replaced
    assert _pool_children(worker.pid) == 1
    wait_for(
        lambda: value(try_scrape(port), "scanqueue_worker_pool_processes") == 1, 5, what="gauge 1"
    )

    # Four at once for most of the run: 13 scans of 3 s in well under 13 x 3 s.
    assert drained_s < (n + 1) * 3 / 2
    # Shrinking never took a scan down with its process (celery#7266).
    assert all(attempts == 1 for _, attempts in _statuses(url))
    assert "WorkerLostError" not in worker.output()
    assert "exited with" not in worker.output()  # every process left cleanly
    print(
        f"\nautoscale [{'redis' if extra else 'sqlite'}] 1->4: grew in {grew_s:.2f}s, "
        f"{n}+2 x 3s scans drained in {drained_s:.1f}s, back to 1 in {shrank_s:.1f}s "
        "after the drain"
    )
