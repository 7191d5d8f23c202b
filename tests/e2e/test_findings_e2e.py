"""Findings over time through a real ``celery -A scanqueue worker`` (docs/reference.md#findings-over-time).

One worker (its embedded bridge dispatches) runs the real runner with ruff as
provider ``lint``; the tree changes between two scans enqueued with the CLI, and
``scanqueue diff`` / ``findings --state`` / ``status`` and the ``scan.completed``
event say what changed.  SQLite and PostgreSQL (events in the table: no Redis).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from scanqueue.config import normalize_database_url
from scanqueue.db.schema import events
from tests.conftest import Proc, base_env, run_cli, start_worker, upgrade

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RUFF = [str(BIN / "ruff"), "check", "--isolated", "--select", "F", "--no-cache"]
RUFF += ["--output-format", "sarif", "."]


def wait_finished(env: dict[str, str], scan_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        scan: dict[str, Any] = json.loads(run_cli(env, "status", scan_id, "--json").stdout)
        if scan["status"] in ("completed", "failed", "canceled"):
            return scan
        assert time.monotonic() < deadline, f"scan {scan_id} still {scan['status']}"
        time.sleep(0.2)


def enqueue(env: dict[str, str]) -> str:
    return run_cli(env, "enqueue", "--provider", "lint").stdout.strip()


def test_a_worker_diffs_each_scan_against_the_last_good_one(
    db_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(db_url)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.py").write_text("import os\n")
    (tree / "b.py").write_text("import sys\n")
    env = base_env(
        db_url, tmp_path, SCANQUEUE_RUNNER="scanqueue:ScanRunner", SCANQUEUE_POLL_EVERY="0.2"
    )
    config = json.dumps({"command": RUFF, "cwd": str(tree), "timeout": 60})
    run_cli(env, "providers", "add", "lint", "--kind", "sarif-command", "--config", config)
    start_worker(procs, env, tmp_path, "--autoscale=1,1")

    first = wait_finished(env, enqueue(env))
    assert first["status"] == "completed", first
    assert (first["findings_count"], first["findings_new"], first["findings_fixed"]) == (2, 2, 0)

    (tree / "a.py").write_text("\n")  # fixed
    (tree / "c.py").write_text("import json\n")  # new
    second = wait_finished(env, enqueue(env))
    assert second["status"] == "completed", second
    assert (second["findings_new"], second["findings_fixed"]) == (1, 1)
    assert second["baseline_id"] == first["id"]

    diff = json.loads(run_cli(env, "diff", second["id"], "--json").stdout)
    assert [f["resource"] for f in diff["new"]] == ["c.py"]
    assert [f["resource"] for f in diff["fixed"]] == ["a.py"]
    assert (diff["baseline_id"], diff["unchanged"], diff["reopened"]) == (first["id"], 1, [])
    listed = json.loads(run_cli(env, "findings", second["id"], "--state", "fixed", "--json").stdout)
    assert [f["location"] for f in listed] == ["a.py:1:8"]
    human = run_cli(env, "status", second["id"]).stdout
    assert "1 new, 1 fixed" in human and "duration" in human

    engine = create_engine(normalize_database_url(db_url))
    deadline = time.monotonic() + 15
    while True:  # events are written by a sender thread: give it a moment
        with engine.connect() as conn:
            rows = conn.execute(
                select(events.c.payload).where(
                    events.c.scan_id == second["id"], events.c.type == "scan.completed"
                )
            ).all()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    engine.dispose()
    assert len(rows) == 1
    payload = rows[0].payload
    payload = json.loads(payload) if isinstance(payload, str) else payload
    assert (payload["findings_new"], payload["findings_fixed"]) == (1, 1)
