"""Schedules (docs/reference.md#schedules) against real SQLite and PostgreSQL: storing, firing, policies, CLI.

Firing is driven with an explicit ``now`` so the policies (missed ``once`` /
``skip``, overlap ``skip`` / ``queue``) are tested at exact instants; the
leader's real loop is exercised in tests/faults/test_schedules_failover.py.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, text, update

from scanqueue.db.schedule_spec import validate_schedule
from scanqueue.db.schema import scan_schedules, scans
from scanqueue.db.store import Store
from scanqueue.dispatch.schedules import fire_due_once
from scanqueue.errors import ConflictError, NotFoundError
from tests.conftest import base_env, run_cli

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _add(store: Store, name: str = "nightly", **fields: Any) -> Any:
    body: dict[str, Any] = {"name": name, "every_seconds": 60, "providers": ["aws"]}
    body.update(fields)
    if "cron" in fields:
        del body["every_seconds"]
    return store.add_schedule(validate_schedule(body))


def _set_next(store: Store, name: str, at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            update(scan_schedules).where(scan_schedules.c.name == name).values(next_run_at=at)
        )


def _scheduled(store: Store, name: str) -> list[dict[str, Any]]:
    with store.engine.begin() as conn:
        rows = conn.execute(
            select(scans).where(scans.c.schedule_name == name).order_by(scans.c.scheduled_for)
        ).all()
    return [dict(r._mapping) for r in rows]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, event_type: str, scan_id: str, payload: Any) -> None:
        self.seen.append((event_type, scan_id, dict(payload)))


def test_add_list_pause_resume_remove(store: Store) -> None:
    row = _add(store, cron="0 3 * * *", tz="Europe/Berlin", frameworks=["soc2"], priority=5)
    assert row.next_run_at is not None and row.next_run_at > store.db_time()
    assert row.next_run_at.astimezone(UTC).hour in (1, 2)  # 03:00 Berlin
    with pytest.raises(ConflictError, match="exists already"):
        _add(store, cron="0 4 * * *")
    assert [r.name for r in store.list_schedules()] == ["nightly"]
    assert store.pause_schedule("nightly").paused
    assert store.due_schedules(row.next_run_at + timedelta(days=2)) == []
    resumed = store.resume_schedule("nightly")
    assert not resumed.paused and resumed.next_run_at is not None
    assert resumed.to_json()["next_run_at"].endswith("+00:00")
    store.remove_schedule("nightly")
    with pytest.raises(NotFoundError):
        store.remove_schedule("nightly")
    with pytest.raises(NotFoundError):
        store.get_schedule("nightly")


def test_a_due_schedule_fires_one_scan_carrying_its_definition(store: Store) -> None:
    _add(store, every_seconds=60, frameworks=["soc2", "cis"], priority=7, key="acct-1")
    _set_next(store, "nightly", T0)
    events = Events()
    fired = fire_due_once(store, T0 + timedelta(seconds=0.4), emit=events)
    assert [(f.outcome, f.scheduled_for) for f in fired] == [("fired", T0)]
    [scan] = _scheduled(store, "nightly")
    assert scan["status"] == "queued"
    assert scan["scheduled_for"] == T0
    assert (scan["priority"], scan["scan_key"], scan["effective_key"]) == (7, "acct-1", "acct-1")
    assert store.get(scan["id"]).frameworks_scanned == ["soc2", "cis"]
    schedule = store.get_schedule("nightly")
    assert schedule.next_run_at == T0 + timedelta(seconds=60)
    assert schedule.last_scan_id == scan["id"]
    assert events.seen == [
        (
            "schedule.fired",
            scan["id"],
            {
                "schedule": "nightly",
                "scheduled_for": T0.isoformat(timespec="microseconds"),
                "catch_up": False,
            },
        )
    ]
    # The same tick again, or a second leader with the row it read before: nothing.
    assert fire_due_once(store, T0 + timedelta(seconds=0.5)) == []
    assert len(_scheduled(store, "nightly")) == 1


def test_the_database_refuses_a_second_scan_for_one_fire_time(store: Store) -> None:
    values = {
        "status": "queued",
        "providers_scanned": ["aws"],
        "frameworks_scanned": [],
        "schedule_name": "nightly",
        "scheduled_for": T0,
    }
    with store.engine.begin() as conn:
        conn.execute(insert(scans).values(id="a", **values))
    with pytest.raises(sa_exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(scans).values(id="b", **values))
    # Unscheduled rows (NULLs) are never constrained.
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " VALUES ('c', 'queued', '[\"aws\"]', '[]'), ('d', 'queued', '[\"aws\"]', '[]')"
            )
        )


def test_a_stale_leader_loses_the_compare_and_set(store: Store) -> None:
    _add(store, every_seconds=60)
    _set_next(store, "nightly", T0)
    [stale] = store.due_schedules(T0)
    assert store.advance_schedule(stale, T0 + timedelta(seconds=60), T0).outcome == "fired"
    assert store.advance_schedule(stale, T0 + timedelta(seconds=60), T0).outcome == "lost"
    assert len(_scheduled(store, "nightly")) == 1


def test_two_leaders_firing_at_once_make_one_scan_per_fire_time(db_url: str, store: Store) -> None:
    _add(store, every_seconds=10, on_overlap="queue")
    _set_next(store, "nightly", T0)
    leaders = [Store(store.database_url), Store(store.database_url)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def lead(leader: Store) -> None:
        try:
            for i in range(15):
                barrier.wait(timeout=30)
                fire_due_once(leader, T0 + timedelta(seconds=10 * i + 0.2))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=lead, args=(leader,)) for leader in leaders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for leader in leaders:
        leader.dispose()
    assert not errors, errors
    fires = [s["scheduled_for"] for s in _scheduled(store, "nightly")]
    assert fires == [T0 + timedelta(seconds=10 * i) for i in range(15)]


@pytest.mark.parametrize(("on_missed", "expected"), [("once", 1), ("skip", 0)])
def test_three_missed_fire_times(store: Store, on_missed: str, expected: int) -> None:
    _add(store, every_seconds=60, on_missed=on_missed, on_overlap="queue")
    _set_next(store, "nightly", T0)
    # Fire times T0, T0+60, T0+120 went by while no leader ran; now is 54 s past the last.
    now = T0 + timedelta(seconds=174)
    events = Events()
    fire_due_once(store, now, emit=events)
    made = _scheduled(store, "nightly")
    assert len(made) == expected
    assert store.get_schedule("nightly").next_run_at == T0 + timedelta(seconds=180)
    if on_missed == "once":
        assert made[0]["scheduled_for"] == T0 + timedelta(seconds=120)  # the latest missed
        [(kind, _, payload)] = events.seen
        assert kind == "schedule.fired" and payload["catch_up"] is True
    else:
        [(kind, scan_id, payload)] = events.seen
        assert (kind, scan_id) == ("schedule.skipped", "")
        assert "missed" in payload["reason"]
    # And on time again afterwards.
    fire_due_once(store, T0 + timedelta(seconds=180.5))
    assert _scheduled(store, "nightly")[-1]["scheduled_for"] == T0 + timedelta(seconds=180)


def test_a_failover_shorter_than_the_grace_is_not_downtime(store: Store) -> None:
    _add(store, cron="0 3 * * *", on_missed="skip")
    _set_next(store, "nightly", T0)
    fire_due_once(store, T0 + timedelta(seconds=35))  # a leader took over 35 s late
    assert [s["scheduled_for"] for s in _scheduled(store, "nightly")] == [T0]


@pytest.mark.parametrize("on_overlap", ["skip", "queue"])
def test_overlap_policy(store: Store, on_overlap: str) -> None:
    _add(store, every_seconds=60, on_overlap=on_overlap)
    _set_next(store, "nightly", T0)
    fire_due_once(store, T0)
    [first] = _scheduled(store, "nightly")
    events = Events()
    fire_due_once(store, T0 + timedelta(seconds=60), emit=events)  # first still queued
    made = _scheduled(store, "nightly")
    if on_overlap == "skip":
        assert len(made) == 1
        [(kind, scan_id, payload)] = events.seen
        assert (kind, scan_id) == ("schedule.skipped", "")
        assert payload["previous_scan_id"] == first["id"]
        assert first["id"] in payload["reason"]
    else:
        assert len(made) == 2
    assert store.get_schedule("nightly").next_run_at == T0 + timedelta(seconds=120)
    # Once the previous scan finished, the next fire time makes a scan again.
    store.cancel(first["id"])
    if on_overlap == "queue":
        store.cancel(made[1]["id"])
    fire_due_once(store, T0 + timedelta(seconds=120))
    assert _scheduled(store, "nightly")[-1]["scheduled_for"] == T0 + timedelta(seconds=120)


def test_run_now_enqueues_even_when_paused_and_counts_as_the_previous_scan(store: Store) -> None:
    _add(store, every_seconds=60)
    store.pause_schedule("nightly")
    _, scan_id, at = store.run_schedule_now("nightly")
    assert store.get(scan_id).status == "queued"
    assert _scheduled(store, "nightly")[0]["scheduled_for"] == at
    assert store.get_schedule("nightly").last_scan_id == scan_id
    with pytest.raises(NotFoundError):
        store.run_schedule_now("nope")


def test_a_schedule_whose_stored_zone_is_gone_is_paused_not_fatal(store: Store) -> None:
    _add(store, "broken", every_seconds=60)
    _add(store, "fine", every_seconds=60)
    with store.engine.begin() as conn:
        conn.execute(update(scan_schedules).values(next_run_at=T0))
        conn.execute(
            update(scan_schedules).where(scan_schedules.c.name == "broken").values(tz="Nowhere/X")
        )
    events = Events()
    outcomes = {f.schedule: f.outcome for f in fire_due_once(store, T0, emit=events)}
    assert outcomes == {"broken": "invalid", "fine": "fired"}
    assert store.get_schedule("broken").paused
    assert any(e[0] == "schedule.skipped" and "Nowhere/X" in e[2]["reason"] for e in events.seen)


# -- the command line ------------------------------------------------------------------


@pytest.fixture
def env(store: Store, db_url: str, tmp_path: Path) -> dict[str, str]:
    return base_env(db_url, tmp_path)


def test_cli_add_list_run_pause_resume_remove(env: dict[str, str], store: Store) -> None:
    add = run_cli(
        env,
        "schedules",
        "add",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
        "--provider",
        "aws",
        "--framework",
        "soc2",
        "--priority",
        "3",
        "--on-overlap",
        "queue",
        "--json",
    )
    assert add.returncode == 0, add.stderr
    added = json.loads(add.stdout)
    assert added["next_run_at"].endswith("+00:00") and added["on_missed"] == "once"
    listed = json.loads(run_cli(env, "schedules", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["nightly"] and listed[0]["next_run_at"]
    human = run_cli(env, "schedules", "list")
    assert "nightly" in human.stdout and "0 3 * * *" in human.stdout
    run = run_cli(env, "schedules", "run", "nightly")
    assert run.returncode == 0, run.stderr
    scan_id = run.stdout.strip()
    assert store.get(scan_id).status == "queued"
    shown = json.loads(run_cli(env, "status", scan_id, "--json").stdout)
    assert shown["schedule_name"] == "nightly" and shown["scheduled_for"].endswith("+00:00")
    assert json.loads(run_cli(env, "schedules", "pause", "nightly", "--json").stdout)["paused"]
    resumed = run_cli(env, "schedules", "resume", "nightly", "--json")
    assert json.loads(resumed.stdout)["paused"] is False
    assert run_cli(env, "schedules", "remove", "nightly").returncode == 0
    assert json.loads(run_cli(env, "schedules", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cron", "61 * * * *"], "cron"),
        (["--cron", "0 3 * * * *"], "five"),
        (["--cron", "0 3 * * *", "--tz", "Mars/Olympus"], "Mars/Olympus"),
        (["--every", "0"], "every_seconds"),
    ],
)
def test_cli_bad_definitions_are_one_line_exit_1(
    env: dict[str, str], args: list[str], needle: str
) -> None:
    out = run_cli(env, "schedules", "add", "s", *args, "--provider", "aws")
    assert out.returncode == 1, out
    assert out.stderr.count("\n") == 1 and needle in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_duplicate_name_and_unknown_name(env: dict[str, str]) -> None:
    assert (
        run_cli(env, "schedules", "add", "s", "--every", "60", "--provider", "aws").returncode == 0
    )
    dup = run_cli(env, "schedules", "add", "s", "--every", "60", "--provider", "aws")
    assert dup.returncode == 1 and dup.stderr.count("\n") == 1 and "exists" in dup.stderr
    for verb in ("pause", "resume", "run", "remove"):
        out = run_cli(env, "schedules", verb, "nope")
        assert out.returncode == 1 and out.stderr.count("\n") == 1, (verb, out)


def test_cli_cron_and_every_together_or_neither_is_a_usage_error(env: dict[str, str]) -> None:
    both = run_cli(
        env, "schedules", "add", "s", "--cron", "* * * * *", "--every", "5", "--provider", "aws"
    )
    neither = run_cli(env, "schedules", "add", "s", "--provider", "aws")
    assert both.returncode == neither.returncode == 2


def test_a_bridge_ahead_of_the_schema_fires_nothing_and_does_not_fail(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scanqueue.config import normalize_database_url
    from scanqueue.db.migrate import upgrade as run_upgrade
    from scanqueue.dispatch import schedules

    monkeypatch.setattr(schedules, "_not_migrated_warned_at", None)  # warned once per 5 min

    store = Store(normalize_database_url(db_url))
    run_upgrade(store, "0006")  # new code, schema not upgraded yet (a rolling deploy)
    try:
        assert fire_due_once(store, T0) == []
        assert "db upgrade" in caplog.text
    finally:
        store.dispose()
