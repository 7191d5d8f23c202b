"""Webhooks (docs/reference.md#webhooks) against a real HTTP receiver, on SQLite and PostgreSQL.

The receiver (tests/webhook_receiver.py) fails, is down, hangs and recovers;
the leader's run_once (fan-out, claim, delivery in a thread pool) is driven
step by step with short retry delays, so nothing here sleeps through a real
backoff.  The CLI and the API are exercised as users meet them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from starlette.testclient import TestClient

from scanqueue.api.app import create_app
from scanqueue.config import Settings, normalize_database_url
from scanqueue.db.schema import db_now, scans
from scanqueue.db.store import Store, store_for
from scanqueue.db.webhook_spec import validate_webhook
from scanqueue.dispatch.webhooks import WebhookDispatcher
from tests.conftest import base_env, free_port, insert_rows, run_cli, upgrade
from tests.webhook_receiver import Receiver

SECRET = "wh-s3cret-value"
TOKEN = "tok-never-sent-anywhere"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port()).start()
    yield r
    r.stop()


def finish(
    store: Store,
    url: str,
    scan_id: str,
    status: str = "completed",
    *,
    key: str = "aws|soc2",
    findings_new: int | None = None,
    findings_fixed: int | None = None,
) -> None:
    """A scan another program enqueued (with a token), finished as a worker would."""
    insert_rows(url, [scan_id])
    with store.engine.begin() as conn:
        conn.execute(
            update(scans)
            .where(scans.c.id == scan_id)
            .values(
                status=status,
                triggered_by_token=TOKEN,
                effective_key=key,
                started_at=db_now(store.dialect),
                finished_at=db_now(store.dialect),
                findings_new=findings_new,
                findings_fixed=findings_fixed,
                error="boom" if status == "failed" else None,
            )
        )


def write_completed(store: Store, scan_id: str) -> None:
    """A row another program writes completed, with no times but its created_at."""
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " VALUES (:id, 'completed', '[\"aws\"]', '[\"soc2\"]')"
            ),
            {"id": scan_id},
        )


def drive(dispatcher: WebhookDispatcher, until: Any, timeout_s: float = 20.0) -> None:
    """Tick like the leader (every 50 ms here) until ``until()`` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dispatcher.run_once()
        if until():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_every_finished_scan_reaches_a_receiver_that_fails_then_is_down_then_recovers(
    store: Store, db_url: str
) -> None:
    port = free_port()
    hook = store.add_webhook(
        validate_webhook({"url": f"http://127.0.0.1:{port}/hook", "secret": SECRET})
    )
    assert hook.id
    ids = {"c1": "completed", "c2": "completed", "f1": "failed", "x1": "canceled"}
    for scan_id, status in ids.items():
        finish(store, db_url, scan_id, status, findings_new=2, findings_fixed=1)
    dispatcher = WebhookDispatcher(store, timeout_s=2, retry_in_s=lambda n: 0.1)
    try:
        # Down: nothing listens on the port; every try fails and is retried.
        drive(dispatcher, lambda: all(d["attempts"] >= 2 for d in store.deliveries_of()))
        dispatcher.wait_idle(5)
        assert {d["scan_id"] for d in store.deliveries_of()} == set(ids)
        assert all(d["delivered_at"] is None for d in store.deliveries_of())
        assert all("cannot reach" in (d["last_error"] or "") for d in store.deliveries_of())
        # Up, but failing (500) for a while, then recovering.
        receiver = Receiver(port).start()
        receiver.fail_first = 6
        try:
            drive(dispatcher, lambda: set(receiver.delivered()) == set(ids))
            dispatcher.wait_idle(5)
            drive(dispatcher, lambda: all(d["delivered_at"] for d in store.deliveries_of()))
        finally:
            receiver.stop()
    finally:
        dispatcher.close()
    requests = receiver.requests()
    assert sum(1 for r in requests if r.answered == 500) == 6
    by_scan: dict[str, set[str]] = {}
    for r in requests:
        assert r.signature_ok(SECRET), "X-Scanqueue-Signature is the HMAC of the exact body"
        assert r.headers["content-type"] == "application/json"
        by_scan.setdefault(r.json["scan_id"], set()).add(r.headers["x-scanqueue-delivery"])
        assert SECRET not in r.body.decode() and TOKEN not in r.body.decode()
    # One idempotency id per (receiver, scan), the same on every retry.
    assert all(len(v) == 1 for v in by_scan.values())
    assert len({next(iter(v)) for v in by_scan.values()}) == len(ids)
    for scan_id, got in receiver.delivered().items():
        body = got[0].json
        assert body["status"] == ids[scan_id]
        assert body["findings_new"] == 2 and body["findings_fixed"] == 1
        assert body["delivery_id"] == got[0].headers["x-scanqueue-delivery"]
    listed = store.list_webhooks()[0]
    assert (listed.delivered, listed.pending, listed.given_up) == (4, 0, 0)


def test_only_new_findings_and_on_filter_what_each_receiver_gets(
    store: Store, db_url: str, receiver: Receiver
) -> None:
    only_new = receiver.url + "?only-new"
    failed_only = receiver.url + "?failed"
    store.add_webhook(
        validate_webhook({"url": only_new, "secret": SECRET, "only_new_findings": True})
    )
    store.add_webhook(validate_webhook({"url": failed_only, "secret": "other", "events": "failed"}))
    finish(store, db_url, "new2", findings_new=2)
    finish(store, db_url, "new0", findings_new=0)
    finish(store, db_url, "nodiff")  # findings_new NULL: not computed, so nothing new
    finish(store, db_url, "bad", "failed")
    dispatcher = WebhookDispatcher(store, timeout_s=2)
    try:
        drive(dispatcher, lambda: len(receiver.delivered()) >= 2)
        dispatcher.wait_idle(5)
        drive(dispatcher, lambda: store.pending_deliveries() == 0)
    finally:
        dispatcher.close()
    seen = {(r.path.split("?")[1], r.json["scan_id"]) for r in receiver.requests()}
    assert seen == {("only-new", "new2"), ("failed", "bad")}
    for r in receiver.requests():
        assert r.signature_ok(SECRET if "only-new" in r.path else "other")


def test_a_scan_that_finished_before_the_webhook_existed_is_not_sent_and_fan_out_is_idempotent(
    store: Store, db_url: str, receiver: Receiver
) -> None:
    finish(store, db_url, "old")
    time.sleep(0.01)
    store.add_webhook(validate_webhook({"url": receiver.url, "secret": SECRET}))
    time.sleep(0.01)
    finish(store, db_url, "new")
    assert store.fan_out() == (1, 1)  # "old" is not even read
    assert store.fan_out() == (0, 0)
    # A fan-out that runs again over the same scans (two leaders) makes nothing twice.
    with store.engine.begin() as conn:
        conn.execute(update(scans).values(notified_at=None))
    assert store.fan_out() == (1, 0)
    assert [d["scan_id"] for d in store.deliveries_of()] == ["new"]


def test_a_row_written_finished_without_a_finish_time_counts_from_when_it_was_written(
    store: Store, db_url: str, receiver: Receiver
) -> None:
    write_completed(store, "ext-old")
    time.sleep(0.01)
    store.add_webhook(validate_webhook({"url": receiver.url, "secret": SECRET}))
    time.sleep(0.01)
    write_completed(store, "ext-new")
    assert store.fan_out() == (2, 1)  # both read and marked once, only the new one sent
    assert store.fan_out() == (0, 0)
    assert [d["scan_id"] for d in store.deliveries_of()] == ["ext-new"]


def test_a_receiver_that_always_fails_is_given_up_after_the_last_attempt(
    store: Store, db_url: str, receiver: Receiver
) -> None:
    receiver.mode = "fail"
    store.add_webhook(validate_webhook({"url": receiver.url, "secret": SECRET}))
    finish(store, db_url, "s1")
    dispatcher = WebhookDispatcher(store, timeout_s=2, max_attempts=3, retry_in_s=lambda n: 0.05)
    try:
        drive(dispatcher, lambda: store.pending_deliveries() == 0)
    finally:
        dispatcher.close()
    (row,) = store.deliveries_of()
    assert row["attempts"] == 3 and row["delivered_at"] is None
    assert row["last_error"].startswith("gave up after 3 attempts: the receiver answered HTTP 500")
    assert len(receiver.requests()) == 3
    assert store.list_webhooks()[0].given_up == 1


def test_a_hanging_receiver_never_stalls_the_leaders_tick(
    store: Store, db_url: str, receiver: Receiver
) -> None:
    receiver.mode = "hang"
    store.add_webhook(validate_webhook({"url": receiver.url, "secret": SECRET}))
    for i in range(3):
        finish(store, db_url, f"h{i}")
    dispatcher = WebhookDispatcher(store, timeout_s=30)
    try:
        started = time.monotonic()
        assert dispatcher.run_once() == (3, 3)
        assert time.monotonic() - started < 1.0
        # While all three hang, later ticks go on at once (and claim nothing twice).
        for _ in range(5):
            started = time.monotonic()
            assert dispatcher.run_once() == (0, 0)
            assert time.monotonic() - started < 0.5
        assert dispatcher.in_flight == 3
    finally:
        receiver.stop()  # releases the hanging requests
        dispatcher.close()


# -- the CLI and the API -----------------------------------------------------------------------


def test_cli_add_list_remove_never_shows_a_secret(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    env = base_env(db_url, tmp_path, HOOK_SECRET="from-env-secret")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file-secret\n")
    added = run_cli(env, "webhooks", "add", "https://example.test/a", "--secret", SECRET, "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["events"] == ["completed", "failed", "canceled"]
    for args in (
        ("https://u:pw@example.test/b", "--secret-file", str(secret_file), "--on", "failed"),
        ("http://example.test/c", "--secret-env", "HOOK_SECRET", "--only-new-findings"),
    ):
        done = run_cli(env, "webhooks", "add", *args)
        assert done.returncode == 0, done.stderr
    listed = run_cli(env, "webhooks", "list", "--json")
    table = run_cli(env, "webhooks", "list")
    for out in (listed.stdout + listed.stderr, table.stdout + table.stderr, added.stdout):
        for secret in (SECRET, "from-file-secret", "from-env-secret", ":pw@"):
            assert secret not in out
    hooks = json.loads(listed.stdout)
    assert [h["url"] for h in hooks] == [
        "https://example.test/a",
        "https://u:***@example.test/b",
        "http://example.test/c",
    ]
    assert hooks[1]["events"] == ["failed"] and hooks[2]["only_new_findings"] is True
    store = store_for(normalize_database_url(db_url))
    assert sorted(h.id for h in store.list_webhooks()) == [h["id"] for h in hooks]
    # Bad input: one line, exit 1; no secret at all: a usage error.
    for args, code, words in (
        (("ftp://example.test/x", "--secret", "s"), 1, "only http:// and https://"),
        (("https://example.test/a", "--secret", "s"), 1, "exists already"),
        (("https://example.test/y", "--secret", "s", "--on", "done"), 1, "unknown status"),
        (("https://example.test/y",), 2, "exactly one of --secret"),
        (("https://example.test/y", "--secret-env", "NOT_SET_ANYWHERE"), 1, "not set"),
    ):
        done = run_cli(env, "webhooks", "add", *args)
        assert done.returncode == code, (args, done.stderr)
        assert words in done.stderr
        if code == 1:
            assert len(done.stderr.strip().splitlines()) == 1
    assert run_cli(env, "webhooks", "remove", "http://example.test/c").returncode == 0
    gone = run_cli(env, "webhooks", "remove", "http://example.test/c")
    assert gone.returncode == 1 and "no webhook for" in gone.stderr
    assert len(json.loads(run_cli(env, "webhooks", "list", "--json").stdout)) == 2


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    upgrade(db_url)
    settings = Settings.from_env({"DATABASE_URL": normalize_database_url(db_url)})
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c


def test_api_add_list_and_remove_webhooks(client: TestClient) -> None:
    body = {"url": "https://example.test/h", "secret": SECRET, "events": ["completed"]}
    created = client.post("/api/v1/webhooks", json=body)
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["events"] == ["completed"] and "secret" not in hook
    assert created.headers["location"] == f"/api/v1/webhooks/{hook['id']}"
    assert client.post("/api/v1/webhooks", json=body).status_code == 409
    bad = client.post("/api/v1/webhooks", json={"url": "file:///etc/passwd", "secret": ""})
    assert bad.status_code == 422
    assert {d["field"] for d in bad.json()["details"]} == {"url", "secret"}
    assert (
        client.post(
            "/api/v1/webhooks", content=b"{", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    other = client.post(
        "/api/v1/webhooks",
        json={"url": "http://example.test/o", "secret": "x", "only_new_findings": True},
    ).json()
    listed = client.get("/api/v1/webhooks")
    assert listed.status_code == 200 and SECRET not in listed.text
    assert [h["url"] for h in listed.json()["webhooks"]] == [
        "https://example.test/h",
        "http://example.test/o",
    ]
    assert (
        client.delete("/api/v1/webhooks", params={"url": "https://example.test/h"}).status_code
        == 204
    )
    assert (
        client.delete("/api/v1/webhooks", params={"url": "https://example.test/h"}).status_code
        == 404
    )
    assert client.delete("/api/v1/webhooks").status_code == 422
    assert client.delete(f"/api/v1/webhooks/{other['id']}").status_code == 204
    assert client.delete("/api/v1/webhooks/abc").status_code == 422
    assert client.get("/api/v1/webhooks").json() == {"webhooks": []}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"get", "post", "delete"} <= set(paths["/api/v1/webhooks"])


def test_api_webhook_writes_are_guarded(db_url: str) -> None:
    upgrade(db_url)
    url = normalize_database_url(db_url)
    body = {"url": "https://example.test/h", "secret": SECRET}
    with TestClient(
        create_app(Settings.from_env({"DATABASE_URL": url})), base_url="http://evil.test"
    ) as c:
        assert c.post("/api/v1/webhooks", json=body).status_code == 403
    settings = Settings.from_env({"DATABASE_URL": url, "SCANQUEUE_API_TOKEN": "api-tok"})
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        assert c.get("/api/v1/webhooks").status_code == 401
        assert c.post("/api/v1/webhooks", json=body).status_code == 401
        ok = c.post("/api/v1/webhooks", json=body, headers={"Authorization": "Bearer api-tok"})
        assert ok.status_code == 201


def test_without_webhooks_nothing_is_written_and_older_scans_are_never_sent_later(
    store: Store, db_url: str, receiver: Receiver
) -> None:
    for i in range(3):
        finish(store, db_url, f"m{i}")
    assert store.fan_out() == (0, 0)
    with store.engine.connect() as conn:
        marks = conn.execute(select(scans.c.notified_at).where(scans.c.id.like("m%"))).scalars()
        assert list(marks) == [None, None, None]  # a finished scan is written once
    time.sleep(0.01)
    store.add_webhook(validate_webhook({"url": receiver.url, "secret": SECRET}))
    assert store.fan_out() == (0, 0)
    assert store.deliveries_of() == []
    time.sleep(0.01)
    finish(store, db_url, "after")
    assert store.fan_out() == (1, 1)
    assert [d["scan_id"] for d in store.deliveries_of()] == ["after"]


def test_a_schema_older_than_the_code_is_one_warning_not_a_traceback_every_tick(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from scanqueue.db.migrate import upgrade as run_upgrade
    from scanqueue.dispatch.service import _until_schema

    store = store_for(sqlite_url)
    run_upgrade(store, "0008")  # a rolling deploy: new code, old schema
    step = _until_schema("webhooks", WebhookDispatcher(store).run_once)
    with caplog.at_level("WARNING"):
        assert [step() for _ in range(3)] == [None, None, None]
    warned = [r for r in caplog.records if "schema is older" in r.getMessage()]
    assert len(warned) == 1 and "scanqueue db upgrade" in warned[0].getMessage()
