"""Retention (docs/reference.md#retention) on SQLite and PostgreSQL: what is kept, what goes, and
``scanqueue prune --dry-run`` changing nothing.

One history, built with explicit times relative to the database clock, with
SCANQUEUE_RETAIN_DAYS=30 and SCANQUEUE_RETAIN_PER_KEY=2 (days before now,
started → finished):

* key ``k``: k1 −100, k2 −90, k3 −80, k4 −70 (completed); f1 −100 failed,
  c1 −100 canceled; q queued (created −100).  Last two: k3, k4; k3's baseline
  k2 stays; k1 (only the baseline of k2, itself kept as a baseline) goes.
* key ``r``: r1 −50, r2 −45, rlong −44 → −3, r3 −2, r4 −1.  Last two: r4, r3;
  rlong is recent, so its baseline r2 stays; r1 goes.
* key ``x``: x1 −60; xr running since −40 (its baseline x1 stays); x2 −5, x3 −4.
* no key stored (another program's rows), derived ``aws|soc2``: n1 −90 … n4 −60.
  n3, n4 are the last two, n2 is n3's baseline; n1 goes.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from scanqueue.db.retention import PruneCounts
from scanqueue.db.schema import events, findings, scans, webhook_deliveries
from scanqueue.db.store import Store
from scanqueue.dispatch.retention import PrunePass, Retention, prune
from tests.conftest import base_env, run_cli

D = timedelta(days=1)
# id: (status, key, started days ago, finished days ago)
HISTORY: dict[str, tuple[str, str | None, float | None, float | None]] = {
    "k1": ("completed", "k", 100.1, 100),
    "k2": ("completed", "k", 90.1, 90),
    "k3": ("completed", "k", 80.1, 80),
    "k4": ("completed", "k", 70.1, 70),
    "f1": ("failed", "k", 100.1, 100),
    "c1": ("canceled", "k", None, 100),
    "q": ("queued", "k", None, None),
    "r1": ("completed", "r", 50.1, 50),
    "r2": ("completed", "r", 45.1, 45),
    "rlong": ("completed", "r", 44, 3),
    "r3": ("completed", "r", 2.1, 2),
    "r4": ("completed", "r", 1.1, 1),
    "x1": ("completed", "x", 60.1, 60),
    "xr": ("running", "x", 40, None),
    "x2": ("completed", "x", 5.1, 5),
    "x3": ("completed", "x", 4.1, 4),
    "n1": ("completed", None, 90.1, 90),
    "n2": ("completed", None, 80.1, 80),
    "n3": ("completed", None, 70.1, 70),
    "n4": ("completed", None, 60.1, 60),
}
PRUNED = {"k1", "f1", "c1", "r1", "n1"}


def build_history(store: Store) -> None:
    now = store.db_time()

    def ago(days: float | None) -> datetime | None:
        return None if days is None else now - days * D

    rows: list[dict[str, Any]] = []
    for scan_id, (status, key, started, finished) in HISTORY.items():
        created = ago((started or finished or 100) + 0.01)
        rows.append(
            {
                "id": scan_id,
                "status": status,
                "providers_scanned": ["aws"],
                "frameworks_scanned": ["soc2"],
                "triggered_by_token": "tok",
                "effective_key": key,
                "created_at": created,
                "started_at": ago(started),
                "finished_at": ago(finished),
            }
        )
    with store.engine.begin() as conn:
        conn.execute(insert(scans), rows)
        conn.execute(
            insert(findings),
            [
                {"scan_id": r["id"], "check_id": f"c{i}", "provider": "aws"}
                for r in rows
                for i in range(3)
            ],
        )
        conn.execute(
            insert(events),
            [{"scan_id": r["id"], "type": "scan.started", "payload": {}} for r in rows],
        )
        conn.execute(
            insert(webhook_deliveries),
            [
                {
                    "webhook_id": 1,
                    "scan_id": r["id"],
                    "delivery_id": f"d-{r['id']}",
                    "payload": "{}",
                }
                for r in rows
            ],
        )


def snapshot(store: Store) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return {
            "scans": {
                r.id: (r.status, r.effective_key)
                for r in conn.execute(select(scans.c.id, scans.c.status, scans.c.effective_key))
            },
            "findings": conn.execute(select(func.count()).select_from(findings)).scalar_one(),
            "events": conn.execute(select(func.count()).select_from(events)).scalar_one(),
            "deliveries": conn.execute(
                select(func.count()).select_from(webhook_deliveries)
            ).scalar_one(),
        }


def test_prune_keeps_queued_running_the_last_n_per_key_and_kept_scans_baselines(
    store: Store,
) -> None:
    build_history(store)
    counts = PrunePass(store, older_than_days=30, per_key=2, batch=3)  # several batches
    counts.run(pause_s=0)
    left = snapshot(store)
    assert set(left["scans"]) == set(HISTORY) - PRUNED
    assert sorted(counts.counts.scan_ids) == sorted(PRUNED)
    assert (counts.counts.scans, counts.counts.findings, counts.counts.events) == (5, 15, 5)
    assert counts.counts.deliveries == 5
    n = len(HISTORY) - len(PRUNED)
    assert (left["findings"], left["events"], left["deliveries"]) == (3 * n, n, n)
    # Rows another program wrote without a key got the derived one when judged.
    assert {left["scans"][s][1] for s in ("n2", "n3", "n4")} == {"aws|soc2"}
    # A second pass finds nothing more to do: the kept baselines stay kept.
    again = prune(store, older_than_days=30, per_key=2, pause_s=0)
    assert again.scans == 0


def test_dry_run_changes_nothing_and_reports_what_would_go(store: Store) -> None:
    build_history(store)
    before = snapshot(store)
    would = prune(store, older_than_days=30, per_key=2, dry_run=True, pause_s=0)
    assert snapshot(store) == before
    # Rows without a key are judged once a real run has filled it in: reported apart.
    assert sorted(would.scan_ids) == sorted(PRUNED - {"n1"})
    assert (would.scans, would.findings, would.events, would.deliveries) == (4, 12, 4, 4)
    assert would.unkeyed == 4


def test_per_key_zero_keeps_only_baselines_and_recent_scans(store: Store) -> None:
    build_history(store)
    prune(store, older_than_days=30, per_key=0, pause_s=0)
    left = set(snapshot(store)["scans"])
    # k: nothing recent, no queued scan started: all old ones go except the newest
    # completed (the queued scan's future baseline).
    assert {"k1", "k2", "k3", "k4"} & left == {"k4"}
    assert {"r1", "r2", "rlong", "r3", "r4"} & left == {"r2", "rlong", "r3", "r4"}
    assert {"x1", "xr", "x2", "x3"} <= left
    assert "q" in left


def test_the_leaders_retention_does_nothing_when_days_is_zero_and_prunes_in_ticks(
    store: Store,
) -> None:
    build_history(store)
    before = snapshot(store)
    assert Retention(store, days=0, per_key=2).run_once().scans == 0
    assert snapshot(store) == before
    reported: list[PruneCounts] = []
    leader = Retention(store, days=30, per_key=2, report=reported.append)
    total = leader.run_once()
    assert sorted(total.scan_ids) == sorted(PRUNED)
    assert sum(r.scans for r in reported) == 5
    # The next pass waits for PASS_EVERY_S; nothing is left to do anyway.
    assert leader.run_once().scans == 0
    assert set(snapshot(store)["scans"]) == set(HISTORY) - PRUNED


def test_prune_command(store: Store, db_url: str, tmp_path: Path) -> None:
    build_history(store)
    env = base_env(db_url, tmp_path, SCANQUEUE_RETAIN_PER_KEY="2")
    nothing = run_cli(env, "prune")
    assert nothing.returncode == 1
    assert nothing.stderr.strip().startswith("scanqueue: nothing to prune")
    dry = run_cli(env, "prune", "--dry-run", "--older-than", "30", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True and report["scans"] == 4 and report["per_key"] == 2
    assert len(snapshot(store)["scans"]) == len(HISTORY)
    bad = run_cli(env, "prune", "--older-than", "-1")
    assert bad.returncode == 2
    done = run_cli(env, "prune", "--older-than", "30")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 5 scan(s), 15 finding(s), 5 event(s)")
    assert "tok" not in done.stdout + dry.stdout
    assert set(snapshot(store)["scans"]) == set(HISTORY) - PRUNED
    by_env = run_cli({**env, "SCANQUEUE_RETAIN_DAYS": "30"}, "prune", "--json")
    assert json.loads(by_env.stdout)["scans"] == 0
