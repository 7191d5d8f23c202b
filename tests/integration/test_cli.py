"""The `scanqueue` command as a black box: output, JSON shape and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import base_env, run_cli, upgrade

SCAN_KEYS = {
    "id",
    "status",
    "providers_scanned",
    "frameworks_scanned",
    "triggered_by_user",
    "created_at",
    "started_at",
    "finished_at",
    "error",
    "findings_count",
    "attempts",
    "findings_new",
    "findings_fixed",
    "baseline_id",
    # Scan policies (docs/reference.md#policies); ``key`` is the effective key.
    "priority",
    "run_after",
    "scan_key",
    "key",
    "timeout_seconds",
    "retries",
    "labels",
    # Schedules (docs/reference.md#schedules): the schedule and fire time that made it.
    "schedule_name",
    "scheduled_for",
}


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    upgrade(db_url)
    return base_env(db_url, tmp_path)


def test_enqueue_prints_the_id_alone_and_status_shows_it(env: dict[str, str]) -> None:
    out = run_cli(
        env,
        "enqueue",
        "--provider",
        "aws",
        "--provider",
        "gcp",
        "--framework",
        "soc2",
        "--user",
        "ann",
    )
    assert out.returncode == 0, out.stderr
    scan_id = out.stdout.strip()
    assert scan_id and "\n" not in scan_id and " " not in scan_id
    status = run_cli(env, "status", scan_id, "--json")
    scan = json.loads(status.stdout)
    assert set(scan) == SCAN_KEYS
    assert scan["status"] == "queued" and scan["providers_scanned"] == ["aws", "gcp"]
    assert scan["frameworks_scanned"] == ["soc2"] and scan["triggered_by_user"] == "ann"
    assert scan["created_at"].endswith("+00:00") and scan["started_at"] is None
    human = run_cli(env, "status", scan_id)
    assert scan_id in human.stdout and "queued" in human.stdout


def test_enqueue_json_and_list(env: dict[str, str]) -> None:
    a = json.loads(run_cli(env, "enqueue", "--provider", "aws", "--json").stdout)
    b = json.loads(run_cli(env, "enqueue", "--provider", "gcp", "--json").stdout)
    assert set(a) == SCAN_KEYS
    run_cli(env, "cancel", b["id"])
    listed = json.loads(run_cli(env, "list", "--json").stdout)
    assert [s["id"] for s in listed] == [b["id"], a["id"]]  # newest first
    queued = json.loads(run_cli(env, "list", "--status", "queued", "--json").stdout)
    assert [s["id"] for s in queued] == [a["id"]]
    assert a["id"] in run_cli(env, "list").stdout


def test_cancel_then_cancel_again_exits_1_and_changes_nothing(env: dict[str, str]) -> None:
    scan_id = run_cli(env, "enqueue", "--provider", "aws").stdout.strip()
    first = run_cli(env, "cancel", scan_id, "--json")
    assert first.returncode == 0 and json.loads(first.stdout)["status"] == "canceled"
    before = run_cli(env, "status", scan_id, "--json").stdout
    again = run_cli(env, "cancel", scan_id)
    assert again.returncode == 1 and again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1 and "already canceled" in again.stderr
    assert run_cli(env, "status", scan_id, "--json").stdout == before


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_unknown_id_exits_1_with_one_line(env: dict[str, str], command: str) -> None:
    out = run_cli(env, command, "no-such-scan")
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "no-such-scan" in out.stderr


def test_usage_errors_exit_2(env: dict[str, str]) -> None:
    assert run_cli(env, "enqueue").returncode == 2  # --provider is required
    assert run_cli(env, "list", "--status", "sleeping").returncode == 2
    assert run_cli(env, "frobnicate").returncode == 2


def test_bad_configuration_is_one_line_exit_1(tmp_path: Path) -> None:
    env = base_env(f"sqlite:///{tmp_path}/x.db", tmp_path, SCANQUEUE_POLL_EVERY="soon")
    out = run_cli(env, "list")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "scanqueue: SCANQUEUE_POLL_EVERY: expected a number of seconds, got 'soon'"
    ]


def test_unreachable_database_fails_at_once_with_the_password_masked(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = base_env(f"postgres://scanner:hunter2@127.0.0.1:{port}/scans", tmp_path)
    t0 = time.monotonic()
    out = run_cli(env, "list")
    assert out.returncode == 1 and time.monotonic() - t0 < 10
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "hunter2" not in out.stderr and "scanner:***@" in lines[0]


def test_missing_schema_says_to_upgrade(tmp_path: Path) -> None:
    env = base_env(f"sqlite:///{tmp_path}/fresh.db", tmp_path)
    out = run_cli(env, "list")
    assert out.returncode == 1 and "scanqueue db upgrade" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_db_upgrade_twice(tmp_path: Path) -> None:
    env = base_env(f"sqlite:///{tmp_path}/new.db", tmp_path)
    first = run_cli(env, "db", "upgrade")
    second = run_cli(env, "db", "upgrade")
    assert first.returncode == 0 and "upgraded" in first.stdout
    assert second.returncode == 0 and "up to date" in second.stdout
