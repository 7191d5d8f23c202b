"""End to end with real `celery -A scanqueue worker` processes and real brokers.

The "done when" of the core path: the embedded default from an empty directory,
PostgreSQL + Redis with 200 plain-SQL rows each run exactly once, LISTEN/NOTIFY
pickup with a 30 s safety poll, RabbitMQ, and bad start-up input.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Proc,
    all_finished,
    assert_no_overlaps,
    base_env,
    insert_rows,
    read_journal,
    run_cli,
    scan_rows,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = pytest.mark.slow


def pickup_seconds(row: dict[str, object]) -> float:
    created, started = row["created_at"], row["started_at"]
    if isinstance(created, str):  # SQLite text
        from datetime import datetime

        created, started = datetime.fromisoformat(created), datetime.fromisoformat(str(started))
    return (started - created).total_seconds()  # type: ignore[operator]


def test_embedded_default_from_an_empty_directory(tmp_path: Path, procs: list[Proc]) -> None:
    """No environment at all: db upgrade, worker --autoscale=4,2, enqueue → completed."""
    env = {k: v for k, v in base_env("unused", tmp_path).items() if k != "DATABASE_URL"}
    env.pop("SCANQUEUE_QUEUE")
    assert run_cli(env, "db", "upgrade", cwd=tmp_path).returncode == 0
    assert (tmp_path / "scanqueue.db").exists()
    start_worker(procs, env, tmp_path, "--autoscale=4,2")
    scan_id = run_cli(
        env, "enqueue", "--provider", "aws", "--framework", "soc2", cwd=tmp_path
    ).stdout.strip()
    wait_for(
        lambda: (
            '"status": "completed"'
            in run_cli(env, "status", scan_id, "--json", cwd=tmp_path).stdout
        ),
        30,
        interval=0.3,
        what="scan completed",
    )
    assert (tmp_path / "scanqueue-broker.db").exists()


def test_sqlite_rows_start_within_a_poll_interval(tmp_path: Path, procs: list[Proc]) -> None:
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(
        url, tmp_path, SCANQUEUE_POLL_EVERY="0.5", SCANQUEUE_RUNNER="tests.runners:journal_runner"
    )
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_rows(url, ["warm-up"])  # pool processes finish their start-up first
    wait_for(lambda: all_finished(url, 1), 30, interval=0.1, what="warm-up scan")
    ids = [f"p{i}" for i in range(10)]
    for scan_id in ids:
        insert_rows(url, [scan_id])
        time.sleep(0.13)  # spread inserts over the poll phase
    wait_for(lambda: all_finished(url, len(ids) + 1), 30, interval=0.2, what="10 scans done")
    latencies = sorted(pickup_seconds(r) for k, r in scan_rows(url).items() if k != "warm-up")
    print(f"sqlite pickup p50={statistics.median(latencies):.3f}s max={latencies[-1]:.3f}s")
    # One bridge poll (0.5 s) plus the embedded broker's own 0.1 s poll, with slack
    # for this shared 2-core machine.
    assert statistics.median(latencies) < 0.5
    assert latencies[-1] < 0.5 + 0.1 + 0.3


@pytest.mark.postgres
@pytest.mark.redis
def test_postgres_redis_200_plain_sql_rows_each_run_exactly_once(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_RUNNER="tests.runners:journal_runner",
        SCANQUEUE_TEST_RUN_SECONDS="0.01",
    )
    # Two workers, each with an embedded bridge: leadership and the task's CAS
    # must keep every scan to one run.
    start_worker(procs, env, tmp_path, "--autoscale=4,2")
    start_worker(procs, env, tmp_path, "--autoscale=4,2")
    ids = [f"bulk-{i:03d}" for i in range(200)]
    t0 = time.monotonic()
    insert_rows(pg_url, ids[:100])
    insert_rows(pg_url, ids[100:])
    wait_for(lambda: all_finished(pg_url, 200), 90, interval=0.25, what="200 scans done")
    elapsed = time.monotonic() - t0
    found = scan_rows(pg_url)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in found.values())
    journal = read_journal(tmp_path)
    starts = [e["scan_id"] for e in journal if e["kind"] == "start"]
    assert sorted(starts) == ids  # each exactly once
    assert_no_overlaps(journal)
    print(f"200 scans on PostgreSQL+Redis, 2 workers: {elapsed:.2f}s ({200 / elapsed:.0f} scans/s)")


@pytest.mark.postgres
@pytest.mark.redis
def test_listen_notify_starts_a_row_well_under_a_second_with_a_30s_safety_poll(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(pg_url, tmp_path, REDIS_URL=redis_url, SCANQUEUE_POLL_EVERY="30")
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    time.sleep(1.5)  # let the bridge take leadership and LISTEN
    latencies = []
    for i in range(5):
        insert_rows(pg_url, [f"n{i}"])
        wait_for(
            lambda i=i: scan_rows(pg_url)[f"n{i}"]["started_at"] is not None,
            5,
            interval=0.02,
            what="start",
        )
        latencies.append(pickup_seconds(scan_rows(pg_url)[f"n{i}"]))
        time.sleep(0.2)
    print(
        f"PostgreSQL LISTEN pickup: p50={statistics.median(latencies) * 1000:.1f}ms max={max(latencies) * 1000:.1f}ms"
    )
    assert max(latencies) < 1.0


@pytest.mark.rabbitmq
def test_rabbitmq_broker_end_to_end(
    rabbitmq_url: str, pg_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(pg_url, tmp_path, CELERY_BROKER_URL=rabbitmq_url)
    start_worker(procs, env, tmp_path, "--autoscale=2,1")
    ids = [f"amqp-{i}" for i in range(20)]
    insert_rows(pg_url, ids)
    wait_for(lambda: all_finished(pg_url, 20), 60, interval=0.25, what="20 scans over RabbitMQ")
    assert {r["status"] for r in scan_rows(pg_url).values()} == {"completed"}


def test_failing_runner_marks_failed_and_the_worker_goes_on(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(url, tmp_path, SCANQUEUE_RUNNER="tests.runners:failing_runner")
    start_worker(procs, env, tmp_path, "--autoscale=2,1")
    insert_rows(url, ["f1", "f2"])
    wait_for(lambda: all_finished(url, 2), 30, interval=0.2, what="failed scans")
    assert {r["error"] for r in scan_rows(url).values()} == {"scanner exploded on aws"}


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SCANQUEUE_CONCURRENCY", "lots", "SCANQUEUE_CONCURRENCY: expected a whole number"),
        ("SCANQUEUE_RUNNER", "no_such_module_xyz:run", "SCANQUEUE_RUNNER: cannot import module"),
        ("REDIS_URL", "redis://127.0.0.1:port", "REDIS_URL: malformed URL"),
    ],
)
def test_worker_refuses_bad_configuration_with_one_line(
    tmp_path: Path, procs: list[Proc], variable: str, value: str, says: str
) -> None:
    env = base_env(f"sqlite:///{tmp_path}/scans.db", tmp_path, **{variable: value})
    proc = start_worker(procs, env, tmp_path, ready=False)
    assert proc.proc.wait(60) == 1
    out = proc.output().strip().splitlines()
    assert len(out) == 1 and out[0].startswith("scanqueue: ") and says in out[0], out


def test_worker_gives_up_on_an_unreachable_database_after_the_connect_timeout(
    tmp_path: Path, procs: list[Proc]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = base_env(
        f"postgresql://scanner:hunter2@127.0.0.1:{port}/x",
        tmp_path,
        SCANQUEUE_CONNECT_TIMEOUT="3",
        CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path}/b.db",
    )
    t0 = time.monotonic()
    proc = start_worker(procs, env, tmp_path, ready=False)
    assert proc.proc.wait(60) == 1
    took = time.monotonic() - t0
    output = proc.output()
    assert "hunter2" not in output and "scanner:***@" in output
    assert output.count("waiting for the database") >= 2  # each attempt logged
    assert 3 <= took < 30


def test_bridge_command_alone_dispatches_to_a_worker_without_bridge(
    tmp_path: Path, procs: list[Proc]
) -> None:
    from tests.conftest import start_bridge

    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(url, tmp_path)
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=2,1")
    insert_rows(url, ["early"])
    time.sleep(1.5)
    assert scan_rows(url)["early"]["status"] == "queued"  # no bridge yet
    start_bridge(procs, env, tmp_path)
    wait_for(
        lambda: all_finished(url, 1), 30, interval=0.2, what="scan dispatched by scanqueue bridge"
    )


def test_bridge_gives_up_on_an_unreachable_database_with_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = base_env(
        f"postgresql://scanner:hunter2@127.0.0.1:{port}/x", tmp_path, SCANQUEUE_CONNECT_TIMEOUT="2"
    )
    out = run_cli(env, "bridge", timeout=60)
    assert out.returncode == 1
    assert "hunter2" not in out.stderr and "waiting for the database" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("scanqueue: giving up after 2s")


def test_worker_gives_up_on_an_unreachable_broker(tmp_path: Path, procs: list[Proc]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(
        url,
        tmp_path,
        REDIS_URL=f"redis://:hunter2@127.0.0.1:{port}/0",
        SCANQUEUE_CONNECT_TIMEOUT="3",
    )
    proc = start_worker(procs, env, tmp_path, ready=False)
    assert proc.proc.wait(90) == 1
    output = proc.output()
    assert "hunter2" not in output and "waiting for the broker" in output


def test_without_autoscale_the_worker_autoscales_between_the_settings(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(url, tmp_path, SCANQUEUE_CONCURRENCY="1", SCANQUEUE_MAX_CONCURRENCY="3")
    worker = start_worker(procs, env, tmp_path)
    assert "concurrency: {min=1, max=3}" in worker.output()
    explicit = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    assert "concurrency: {min=2, max=2}" in explicit.output()
