"""Prometheus metrics: the observer and hooks in-process, multiprocess aggregation across
real forks, and real `celery -A scanqueue worker` / `scanqueue bridge` processes serving
`/metrics` on SQLite and on PostgreSQL + Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from scanqueue.config import normalize_database_url
from scanqueue.observe.observer import RunInfo
from tests.conftest import (
    REPO,
    Proc,
    base_env,
    free_port,
    start_bridge,
    start_worker,
    upgrade,
    wait_for,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(exposition: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def try_scrape(port: int) -> Samples:
    try:
        return parse(scrape(port))
    except OSError:
        return {}


def insert_rows(url: str, ids: list[str], token: str | None = None) -> None:
    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                " triggered_by_token) VALUES (:id, 'queued', '[\"aws\"]', '[\"soc2\"]', :token)"
            ),
            [{"id": i, "token": token} for i in ids],
        )
    engine.dispose()


def statuses(url: str) -> dict[str, str]:
    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        found = {r.id: r.status for r in conn.execute(text("SELECT id, status FROM scans"))}
    engine.dispose()
    return found


def all_finished(url: str, n: int) -> bool:
    found = statuses(url)
    return len(found) == n and all(s in ("completed", "failed") for s in found.values())


def assert_no_unbounded_labels(exposition: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in exposition
    allowed = {
        # scanqueue_scans{status} adds the other row statuses; any status scanqueue
        # does not know is summed under "unknown", never a label value of its own.
        "status": {"completed", "failed", "canceled", "discarded", "queued", "running", "unknown"},
        # reaped runs; webhook deliveries
        "outcome": {"requeued", "failed", "delivered", "retry", "given_up"},
        "what": {"scans", "findings", "events"},
    }
    for family in text_string_to_metric_families(exposition):
        if not family.name.startswith("scanqueue_"):
            continue
        for s in family.samples:
            for key, label_value in s.labels.items():
                if key == "le":
                    continue
                if family.name.startswith("scanqueue_http_"):
                    # Request metrics: route templates, never the ids in a path.
                    assert _bounded_http_label(key, label_value), (family.name, key, label_value)
                    continue
                assert label_value in allowed.get(key, set()), (family.name, key, label_value)


def _bounded_http_label(key: str, value: str) -> bool:
    if key == "method":
        return value in {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}
    if key == "status":
        return value.isdigit() and len(value) == 3
    if key == "route":
        segments = value.strip("/").split("/")
        return (
            value.startswith("/")
            and all(
                (seg.startswith("{") and seg.endswith("}"))
                or not any(c.isdigit() for c in seg)
                or seg in {"v1"}
                for seg in segments
            )
        ) or value == "(unmatched)"
    return False


# -- in-process -----------------------------------------------------------------------


def _run(scan_id: str, latency_s: float | None) -> RunInfo:
    started = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    return RunInfo(
        scan_id=scan_id,
        attempt=1,
        providers=["aws"],
        frameworks=["soc2"],
        created_at=None if latency_s is None else started - timedelta(seconds=latency_s),
        started_at=started,
    )


class _Row:
    def __init__(self, status: str) -> None:
        self.status = status


def test_observer_counts_outcomes_by_status_with_durations_and_pickup_latency() -> None:
    from prometheus_client import REGISTRY, generate_latest

    from scanqueue.observe.metrics import MetricsObserver

    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "completed": get("scanqueue_scans_finished_total", status="completed"),
        "failed": get("scanqueue_scans_finished_total", status="failed"),
        "discarded": get("scanqueue_scans_finished_total", status="discarded"),
        "canceled": get("scanqueue_scans_finished_total", status="canceled"),
        "started": get("scanqueue_scans_started_total"),
        "durations": get("scanqueue_scan_duration_seconds_count"),
        "pickups": get("scanqueue_pickup_latency_seconds_count"),
        "pickup_sum": get("scanqueue_pickup_latency_seconds_sum"),
    }
    observer = MetricsObserver()
    secret_id = f"scan-{uuid.uuid4().hex}"
    observer.started(_run(secret_id, 2.5))
    observer.started(_run(secret_id, None))  # no created_at: no latency sample
    observer.event(_run(secret_id, 1), "scan.progress", {"percent": 5})
    observer.finished(_run(secret_id, 1), _Row("completed"), 3.0)  # type: ignore[arg-type]
    observer.finished(_run(secret_id, 1), _Row("failed"), 1.0)  # type: ignore[arg-type]
    observer.finished(_run(secret_id, 1), _Row("weird"), 1.0)  # type: ignore[arg-type]
    observer.discarded(_run(secret_id, 1), 0.5)
    observer.canceled(_run(secret_id, 1), 0.25)  # its own label, not "discarded"

    assert get("scanqueue_scans_started_total") - before["started"] == 2
    assert get("scanqueue_pickup_latency_seconds_count") - before["pickups"] == 1
    assert get("scanqueue_pickup_latency_seconds_sum") - before["pickup_sum"] == pytest.approx(2.5)
    assert get("scanqueue_scans_finished_total", status="completed") - before["completed"] == 1
    # An unknown status is folded into "failed" so the label set stays fixed.
    assert get("scanqueue_scans_finished_total", status="failed") - before["failed"] == 2
    assert get("scanqueue_scans_finished_total", status="discarded") - before["discarded"] == 1
    assert get("scanqueue_scans_finished_total", status="canceled") - before["canceled"] == 1
    assert get("scanqueue_scan_duration_seconds_count") - before["durations"] == 5
    assert_no_unbounded_labels(generate_latest(REGISTRY).decode(), [secret_id])


def test_bridge_hooks_set_depth_and_leader_and_count_dispatches_and_reaps() -> None:
    from prometheus_client import REGISTRY

    from scanqueue.observe.metrics import bridge_hooks, render_metrics

    def get(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    dispatched_before = get("scanqueue_scans_dispatched_total") or 0.0
    requeued_before = get("scanqueue_scans_reaped_total", outcome="requeued") or 0.0
    hooks = bridge_hooks()
    assert get("scanqueue_bridge_leader") == 0  # a fresh bridge is not the leader
    assert hooks.queue_depth and hooks.leader and hooks.dispatched and hooks.reaped
    hooks.queue_depth(7)
    hooks.leader(True)
    hooks.dispatched(3)
    hooks.reaped(2, 0)
    assert get("scanqueue_queue_depth") == 7
    assert get("scanqueue_bridge_leader") == 1
    assert get("scanqueue_scans_dispatched_total") == dispatched_before + 3
    assert get("scanqueue_scans_reaped_total", outcome="requeued") == requeued_before + 2
    hooks.leader(False)
    body, content_type = render_metrics()
    assert content_type.startswith("text/plain")
    assert value(parse(body.decode()), "scanqueue_bridge_leader") == 0


def test_render_metrics_counts_the_queue_for_a_web_process(store: object) -> None:
    from scanqueue.db.store import Store
    from scanqueue.observe.metrics import render_metrics

    assert isinstance(store, Store)
    store.enqueue(["aws"], ["soc2"])
    store.enqueue(["gcp"], [])
    body, _ = render_metrics(store)
    assert value(parse(body.decode()), "scanqueue_queue_depth") == 2


def test_serve_metrics_names_the_variable_when_the_port_is_taken() -> None:
    import socket

    from scanqueue.errors import ConfigError
    from scanqueue.observe.metrics import serve_metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match="SCANQUEUE_METRICS_PORT"):
            serve_metrics(port, addr="127.0.0.1")


def test_metrics_listen_on_all_interfaces_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scanqueue.observe.metrics import metrics_addr

    monkeypatch.delenv("SCANQUEUE_METRICS_ADDR", raising=False)
    assert metrics_addr() == "0.0.0.0"
    monkeypatch.setenv("SCANQUEUE_METRICS_ADDR", " 127.0.0.1 ")
    assert metrics_addr() == "127.0.0.1"


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    from pathlib import Path

    stale = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")) / "counter_999999.db"
    if os.environ.get("PLANT_STALE"):
        stale.write_bytes(b"garbage from a previous run")

    from scanqueue.observe import metrics, metrics_multiprocess

    path = metrics_multiprocess.prepare_multiprocess_dir()
    assert not stale.exists(), "stale files of a previous run must be removed"
    hooks = metrics.bridge_hooks()
    hooks.leader(True)
    hooks.queue_depth(5)
    metrics.report_pool(3, 1)
    from scanqueue.observe.observer import RunInfo

    children = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            observer = metrics.MetricsObserver()
            run = RunInfo(scan_id=f"s{i}", attempt=1, providers=[], frameworks=[])
            observer.started(run)

            class Row:
                status = "completed" if i < 2 else "failed"

            observer.finished(run, Row(), 1.5)
            # A child touching inherited gauges writes 0s of its own (livemax ignores them).
            hooks.leader(False)
            metrics_multiprocess.mark_process_dead(os.getpid())
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    body, _ = metrics.render_metrics()
    sys.stdout.write(body.decode())
    sys.stderr.write("DIR=" + path)
    """
)


@pytest.mark.parametrize("given_dir", [False, True])
def test_multiprocess_mode_aggregates_forked_processes_and_keeps_parent_gauges(
    tmp_path: Path, given_dir: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO)
    if given_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
        (tmp_path / "prom").mkdir()
        env["PLANT_STALE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    samples = parse(out.stdout)
    assert value(samples, "scanqueue_scans_finished_total", status="completed") == 2
    assert value(samples, "scanqueue_scans_finished_total", status="failed") == 1
    assert value(samples, "scanqueue_scans_started_total") == 3
    assert value(samples, "scanqueue_scan_duration_seconds_count") == 3
    assert value(samples, "scanqueue_bridge_leader") == 1
    assert value(samples, "scanqueue_queue_depth") == 5
    assert value(samples, "scanqueue_worker_pool_processes") == 3
    used = Path(out.stderr.rsplit("DIR=", 1)[1].strip())
    if given_dir:
        assert used == tmp_path / "prom" and used.is_dir()  # a given directory is kept
    else:
        assert used.name.startswith("scanqueue-metrics-")
        assert not used.exists()  # a temporary one is removed at exit


# -- real processes -------------------------------------------------------------------


def _backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scans.db'}", {}
    return request.getfixturevalue("pg_url"), {"REDIS_URL": request.getfixturevalue("redis_url")}


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    return _backend(request, tmp_path)


@pytest.mark.slow
def test_worker_serves_what_its_pool_processes_did(
    backend: tuple[str, dict[str, str]], tmp_path: Path, procs: list[Proc]
) -> None:
    url, extra = backend
    upgrade(url)
    port = free_port()
    env = base_env(
        url,
        tmp_path,
        SCANQUEUE_METRICS_PORT=str(port),
        SCANQUEUE_RUNNER="tests.runners:journal_runner",
        **extra,
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=3,2")
    token = f"tok-{uuid.uuid4().hex}"
    ids = [f"m-{uuid.uuid4().hex}" for _ in range(5)]
    insert_rows(url, ids, token=token)
    wait_for(lambda: all_finished(url, 5), 60, interval=0.2, what="5 scans finished")

    def counted() -> Samples | None:
        samples = try_scrape(port)
        done = value(samples, "scanqueue_scans_finished_total", status="completed")
        return samples if done == 5 else None

    samples = wait_for(counted, 10, interval=0.2, what="5 completed scans on /metrics")
    assert value(samples, "scanqueue_scans_started_total") == 5
    assert value(samples, "scanqueue_scan_duration_seconds_count") == 5
    assert value(samples, "scanqueue_pickup_latency_seconds_count") == 5
    assert value(samples, "scanqueue_bridge_leader") == 1
    assert value(samples, "scanqueue_scans_dispatched_total") == 5
    assert (value(samples, "scanqueue_worker_pool_processes") or 0) >= 2
    wait_for(
        lambda: value(try_scrape(port), "scanqueue_queue_depth") == 0, 10, what="queue depth 0"
    )
    assert_no_unbounded_labels(scrape(port), [token, *ids])
    assert "metrics on http://127.0.0.1:" in worker.output()
    assert token not in worker.output()


@pytest.mark.slow
def test_worker_without_bridge_serves_pool_metrics_and_a_bridge_serves_queue_depth(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(url)
    bridge_port, worker_port = free_port(), free_port()
    env = base_env(url, tmp_path, SCANQUEUE_RUNNER="tests.runners:journal_runner")
    start_bridge(procs, {**env, "SCANQUEUE_METRICS_PORT": str(bridge_port)}, tmp_path)
    insert_rows(url, ["d1", "d2", "d3"])
    wait_for(
        lambda: value(try_scrape(bridge_port), "scanqueue_queue_depth") == 3,
        15,
        interval=0.2,
        what="the bridge to count 3 queued scans",
    )
    assert value(try_scrape(bridge_port), "scanqueue_bridge_leader") == 1

    start_worker(
        procs,
        {**env, "SCANQUEUE_METRICS_PORT": str(worker_port)},
        tmp_path,
        "--without-bridge",
        "--autoscale=2,1",
    )
    wait_for(lambda: all_finished(url, 3), 60, interval=0.2, what="3 scans finished")
    samples = wait_for(
        lambda: (
            s
            if value(
                s := try_scrape(worker_port), "scanqueue_scans_finished_total", status="completed"
            )
            == 3
            else None
        ),
        10,
        interval=0.2,
        what="3 completed scans on the worker's /metrics",
    )
    # No bridge in that worker: it exports no queue depth or leadership of its own.
    assert not any(
        name.startswith(("scanqueue_queue_depth", "scanqueue_bridge")) for name, _ in samples
    )
    assert value(samples, "scanqueue_worker_pool_processes") in (1, 2)
    wait_for(
        lambda: value(try_scrape(bridge_port), "scanqueue_queue_depth") == 0,
        10,
        interval=0.2,
        what="the bridge's queue depth back to 0",
    )


@pytest.mark.slow
@pytest.mark.redis
def test_leader_flag_is_1_on_exactly_one_of_two_bridges(
    redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(url)
    env = base_env(url, tmp_path, REDIS_URL=redis_url)
    ports = [free_port(), free_port()]
    bridges = [
        start_bridge(procs, {**env, "SCANQUEUE_METRICS_PORT": str(p)}, tmp_path) for p in ports
    ]

    def flags() -> list[float | None]:
        return [value(try_scrape(p), "scanqueue_bridge_leader") for p in ports]

    wait_for(lambda: sorted(f or 0 for f in flags()) == [0, 1], 15, what="one leader")
    time.sleep(2)  # and it stays that way
    assert sorted(f or 0 for f in flags()) == [0, 1]
    # The leader stops cleanly: the other one takes over and says so.
    leader = bridges[flags().index(1)]
    other_port = ports[1 - flags().index(1)]
    leader.stop()
    wait_for(
        lambda: value(try_scrape(other_port), "scanqueue_bridge_leader") == 1,
        30,
        interval=0.2,
        what="the standby to become leader",
    )


# -- Flower -----------------------------------------------------------------------------


def _http(url: str, auth: str | None = None, method: str = "GET") -> tuple[int, str]:
    import base64
    import urllib.error

    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if method == "POST":
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


@pytest.mark.slow
@pytest.mark.redis
def test_flower_shows_the_worker_and_scan_tasks_whose_args_are_only_the_scan_id(
    redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    from tests.conftest import BIN

    url = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(url)
    env = base_env(url, tmp_path, REDIS_URL=redis_url)
    # As deployed: heartbeats and gossip on (the test default turns them off), so the
    # worker has an event dispatcher for Flower to switch task events on.
    worker_name = f"w{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    worker = Proc(
        [str(BIN / "celery"), "-A", "scanqueue", "worker", "-l", "info", "-n", worker_name],
        env,
        tmp_path,
        "worker",
    )
    procs.append(worker)
    worker.wait_for_output("ready.", timeout=60)
    port = free_port()
    auth = "admin:s3cret-pw"
    flower_env = {**env, "FLOWER_BASIC_AUTH": auth}
    procs.append(
        Proc(
            [
                str(BIN / "celery"),
                "-A",
                "scanqueue",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                "--read_only",
            ],
            flower_env,
            tmp_path,
            "flower",
        )
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _http(f"{base}/healthcheck") == (200, "OK"), 30, interval=0.3, what="flower")
    assert _http(f"{base}/")[0] == 401  # the dashboard wants the password
    assert _http(f"{base}/api/workers")[0] == 401
    wait_for(
        lambda: worker_name in _http(f"{base}/api/workers?refresh=1", auth)[1],
        30,
        interval=0.5,
        what="the worker in Flower",
    )
    worker.wait_for_output("Events of group {task} enabled by remote", timeout=20)
    token = f"tok-{uuid.uuid4().hex}"
    scan_id = f"flower-{uuid.uuid4().hex[:8]}"
    insert_rows(url, [scan_id], token=token)

    def task_seen() -> str | None:
        status, body = _http(f"{base}/api/tasks", auth)
        return body if status == 200 and scan_id in body else None

    body = wait_for(task_seen, 30, interval=0.5, what="the scan task in Flower")
    import json

    tasks = [t for t in json.loads(body).values() if scan_id in str(t.get("args"))]
    assert tasks and tasks[0]["name"] == "scanqueue.run_scan"
    assert tasks[0]["args"] in (f"['{scan_id}']", f"('{scan_id}',)")
    assert token not in body
    # Read-only: the password does not let anyone start tasks through the API.
    status, _ = _http(f"{base}/api/task/async-apply/scanqueue.run_scan", auth, method="POST")
    assert status == 403


# -- JSON logs ----------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_logs_json_lines_with_the_lifecycle_and_never_the_token(
    tmp_path: Path, procs: list[Proc]
) -> None:
    import json

    url = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(url)
    env = base_env(url, tmp_path, SCANQUEUE_LOG_FORMAT="json")
    worker = start_worker(procs, env, tmp_path, "--autoscale=1,1", "-l", "debug")
    token = f"tok-{uuid.uuid4().hex}"
    insert_rows(url, ["json-1"], token=token)
    worker.wait_for_output("scan json-1 attempt 1 completed", timeout=30)
    entries = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    messages = {e["message"]: e for e in entries}
    started = messages["scan json-1 attempt 1 started"]
    assert started["level"] == "info" and started["logger"].startswith("scanqueue")
    assert started["process"] != worker.pid  # logged by the pool process, in JSON too
    assert any(m.startswith("scan json-1 attempt 1 completed in ") for m in messages)
    assert {"at", "level", "logger", "message", "process"} <= set(started)
    assert token not in worker.output()
