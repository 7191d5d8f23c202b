"""``run_after`` with a real worker, on rows another program wrote (docs/reference.md#policies).

A row whose ``run_after`` lies ahead waits ``queued`` while plain rows behind it run,
then starts once that moment has passed, within a poll interval.  On SQLite the
column is text, and other programs write timestamps in more than one ISO-8601 shape
("2026-12-06T10:00:00Z" as well as SQLAlchemy's "2026-12-06 10:00:00.000000"):
each must mean the same moment.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from scanqueue.config import normalize_database_url
from tests.conftest import Proc, base_env, insert_rows, scan_rows, start_worker, upgrade, wait_for

pytestmark = pytest.mark.slow

DELAY_S = 3.0


def _insert_delayed(url: str, rows: dict[str, str]) -> None:
    """``{id: run_after literal}``, inserted with plain SQL as another program would."""
    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        for scan_id, run_after in rows.items():
            conn.execute(
                text(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                    " run_after) VALUES (:id, 'queued', '[\"aws\"]', '[\"soc2\"]', :run_after)"
                ),
                {"id": scan_id, "run_after": run_after},
            )
    engine.dispose()


def test_a_row_with_run_after_ahead_waits_then_starts(
    db_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(db_url)
    extra = {"REDIS_URL": redis_url} if db_url.startswith("postgresql") else {}
    env = base_env(db_url, tmp_path, SCANQUEUE_POLL_EVERY="0.5", **extra)
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    due = datetime.now(UTC) + timedelta(seconds=DELAY_S)
    if db_url.startswith("postgresql"):
        delayed = {"later-iso": due.isoformat()}
    else:
        delayed = {
            "later-iso-z": due.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "later-iso-t": due.strftime("%Y-%m-%dT%H:%M:%S.%f"),
            "later-plain": due.strftime("%Y-%m-%d %H:%M:%S.%f"),
        }
    inserted = time.monotonic()
    _insert_delayed(db_url, delayed)
    insert_rows(db_url, ["now-1", "now-2"])
    wait_for(
        lambda: all(scan_rows(db_url)[i]["status"] == "completed" for i in ("now-1", "now-2")),
        20,
        what="the plain rows behind the delayed ones ran",
    )
    if time.monotonic() - inserted < DELAY_S - 0.5:
        assert all(scan_rows(db_url)[i]["status"] == "queued" for i in delayed)
    wait_for(
        lambda: all(scan_rows(db_url)[i]["status"] == "completed" for i in delayed),
        DELAY_S + 10,
        what="the delayed rows ran once due",
    )
    took = time.monotonic() - inserted
    assert took >= DELAY_S - 1.0  # whole seconds in one format; never early by more
    rows = scan_rows(db_url)
    for scan_id in delayed:
        started = rows[scan_id]["started_at"]
        if isinstance(started, str):
            started = datetime.fromisoformat(started)
        if started.tzinfo is None:
            started = started.replace(tzinfo=UTC)
        # Not before run_after (the whole-second format may round down by < 1 s).
        assert started >= due - timedelta(seconds=1), (scan_id, started, due)
        assert started <= due + timedelta(seconds=5), (scan_id, started, due)
