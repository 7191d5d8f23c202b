"""The queue-depth autoscaler: the pure decision, the sampler, the Celery class with a
fake pool, and real workers growing under a backlog of slow scans and shrinking back.
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
    AutoscaleConfig,
    BacklogSampler,
    Policy,
    QueueDepthAutoscaler,
    Sample,
    ScaleState,
    decide,
)
from tests.conftest import REPO, Proc, base_env, free_port, start_worker, upgrade, wait_for

POLICY = Policy(min_processes=2, max_processes=6, threshold=0, grow_after_s=3, keepalive_s=10)


def sample(
    now: float,
    processes: int = 2,
    reserved: int = 2,
    active: int | None = None,
    backlog: int = 0,
    last_received: float | None = None,
) -> Sample:
    return Sample(
        now=now,
        processes=processes,
        reserved=reserved,
        active=reserved if active is None else active,
        backlog=backlog,
        last_received=last_received,
    )


def run(policy: Policy, samples: list[Sample], state: ScaleState | None = None) -> list[int]:
    state = state or ScaleState()
    deltas = []
    for s in samples:
        decision = decide(policy, state, s)
        state = decision.state
        deltas.append(decision.delta)
    return deltas


# -- decide() -------------------------------------------------------------------------


def test_grows_only_after_the_backlog_stayed_above_the_threshold_for_the_period() -> None:
    deltas = run(POLICY, [sample(t, backlog=10) for t in (0, 1, 2, 2.9, 3.0)])
    assert deltas == [0, 0, 0, 0, 4]  # by the excess, capped at max (6 - 2)


def test_grows_by_the_excess_over_the_threshold() -> None:
    policy = Policy(min_processes=2, max_processes=10, threshold=2, grow_after_s=1)
    assert run(policy, [sample(0, backlog=5), sample(1, backlog=5)]) == [0, 3]


def test_a_dip_below_the_threshold_restarts_the_period() -> None:
    samples = [
        sample(0, backlog=3),
        sample(2, backlog=0),
        sample(3, backlog=3),
        sample(5, backlog=3),
    ]
    assert run(POLICY, samples) == [0, 0, 0, 0]
    assert run(POLICY, [*samples, sample(6, backlog=3)])[-1] == 3


def test_does_not_grow_while_a_process_is_free() -> None:
    # A backlog held by other workers is not this worker's to absorb while it idles.
    deltas = run(POLICY, [sample(t, reserved=1, backlog=10) for t in range(10)])
    assert deltas == [0] * 10


def test_waits_another_period_before_growing_again() -> None:
    policy = Policy(min_processes=1, max_processes=8, threshold=0, grow_after_s=2, keepalive_s=30)
    state = ScaleState()
    grown = []
    procs = 1
    for t in range(9):
        d = decide(policy, state, sample(t, processes=procs, reserved=procs, backlog=2))
        state = d.state
        procs += d.delta
        grown.append(procs)
    assert grown == [1, 1, 3, 3, 5, 5, 7, 7, 8]


def test_never_grows_past_max_and_restores_the_minimum_at_once() -> None:
    assert (
        run(POLICY, [sample(t, processes=6, reserved=6, backlog=50) for t in range(10)]) == [0] * 10
    )
    assert decide(POLICY, ScaleState(), sample(0, processes=1, reserved=0)).delta == 1


def test_shrinks_after_keepalive_of_surplus_to_what_was_needed_meanwhile() -> None:
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=6, reserved=3),
        sample(5, processes=6, reserved=4),  # the peak of the window
        sample(9.9, processes=6, reserved=1),
        sample(10, processes=6, reserved=1),
    ]
    assert run(POLICY, samples, s0) == [0, 0, 0, -2]


def test_shrinks_no_lower_than_the_minimum() -> None:
    s0 = ScaleState(last_change=-100)
    assert run(
        POLICY, [sample(0, processes=6, reserved=0), sample(10, processes=6, reserved=0)], s0
    ) == [0, -4]


def test_a_busy_moment_restarts_the_keepalive() -> None:
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=4, reserved=1),
        sample(6, processes=4, reserved=4),  # every process needed again
        sample(12, processes=4, reserved=0),
        sample(21, processes=4, reserved=0),
        sample(22, processes=4, reserved=0),
    ]
    assert run(POLICY, samples, s0) == [0, 0, 0, 0, -2]


def test_no_shrink_within_keepalive_of_the_last_change() -> None:
    state = ScaleState(last_change=5)
    assert run(
        POLICY, [sample(0, processes=6, reserved=0), sample(12, processes=6, reserved=0)], state
    ) == [0, 0]
    assert run(
        POLICY, [sample(0, processes=6, reserved=0), sample(15, processes=6, reserved=0)], state
    ) == [0, -4]


def test_no_shrink_while_a_reserved_scan_is_not_yet_accepted_by_a_process() -> None:
    # celery#7266: the process being handed the scan looks idle until it accepts it.
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=6, reserved=1, active=0),
        sample(10, processes=6, reserved=1, active=0),
    ]
    assert run(POLICY, samples, s0) == [0, 0]
    samples.append(sample(11, processes=6, reserved=1, active=1))
    assert run(POLICY, samples, s0)[-1] == -4


def test_no_shrink_right_after_a_scan_arrived() -> None:
    s0 = ScaleState(last_change=-100)
    samples = [
        sample(0, processes=6, reserved=0),
        sample(10, processes=6, reserved=0, last_received=9.5),
        sample(12, processes=6, reserved=0, last_received=9.5),
    ]
    assert run(POLICY, samples, s0) == [0, 0, -4]


# -- sampling and configuration ---------------------------------------------------------


def test_sampler_counts_a_failed_or_stale_sample_as_zero_not_the_last_value() -> None:
    values: list[Any] = [5, RuntimeError("broker down"), None, 3]

    def read() -> int | None:
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

    def read() -> int:
        calls.append(time.monotonic())
        return len(calls)

    sampler = BacklogSampler(read, every_s=0.05, what="database")
    sampler.start()
    try:
        wait_for(lambda: len(calls) >= 3, 5, what="three samples")
    finally:
        sampler.stop()
    assert sampler.latest(time.monotonic()) >= 3


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
    assert AutoscaleConfig.from_env({}) == AutoscaleConfig("db", 0, 1.0, 1.0, 1.0)
    config = AutoscaleConfig.from_env(
        {
            "SCANQUEUE_AUTOSCALE_SOURCE": "Broker",
            "SCANQUEUE_AUTOSCALE_THRESHOLD": "4",
            "SCANQUEUE_AUTOSCALE_GROW_AFTER": "0.5",
            "SCANQUEUE_AUTOSCALE_SAMPLE_EVERY": "2",
            "SCANQUEUE_AUTOSCALE_TICK": "0.25",
        }
    )
    assert config == AutoscaleConfig("broker", 4, 0.5, 2.0, 0.25)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SCANQUEUE_AUTOSCALE_SOURCE", "rabbit"),
        ("SCANQUEUE_AUTOSCALE_THRESHOLD", "1.5"),
        ("SCANQUEUE_AUTOSCALE_THRESHOLD", "-1"),
        ("SCANQUEUE_AUTOSCALE_GROW_AFTER", "soon"),
        ("SCANQUEUE_AUTOSCALE_TICK", "0"),
        ("SCANQUEUE_AUTOSCALE_SAMPLE_EVERY", "nan"),
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
        pool, 4, 1, worker=None, keepalive=0.5, config=config, read_backlog=lambda: backlog["n"]
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
    scaler = QueueDepthAutoscaler(pool, 3, 1, keepalive=0.1, config=config, read_backlog=lambda: 0)
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
        read_backlog=lambda: 10,
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


@pytest.mark.slow
def test_worker_grows_under_a_backlog_of_slow_scans_and_returns_to_the_minimum(
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
        SCANQUEUE_AUTOSCALE_GROW_AFTER="1",
        SCANQUEUE_METRICS_PORT=str(port),
        AUTOSCALE_KEEPALIVE="2",
        **extra,
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=4,1")
    assert "{min=1, max=4}" in worker.output()
    wait_for(lambda: _pool_children(worker.pid) == 1, 10, what="one pool process at rest")

    n = 12
    t0 = time.monotonic()
    _insert(url, [f"a-{uuid.uuid4().hex[:8]}" for _ in range(n)])
    wait_for(lambda: _pool_children(worker.pid) == 4, 20, interval=0.1, what="grow to 4")
    grew_s = time.monotonic() - t0
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

    # Four at once for most of the run: 12 scans of 3 s in well under 12 x 3 s.
    assert drained_s < 12 * 3 / 2
    # Shrinking never took a scan down with its process (celery#7266).
    assert all(attempts == 1 for _, attempts in _statuses(url))
    assert "WorkerLostError" not in worker.output()
    assert "exited with" not in worker.output()  # every process left cleanly
    print(
        f"\nautoscale [{'redis' if extra else 'sqlite'}] 1->4: grew in {grew_s:.1f}s, "
        f"12x3s scans drained in {drained_s:.1f}s, back to 1 in {shrank_s:.1f}s after the drain"
    )
