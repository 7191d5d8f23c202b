"""`scanqueue db upgrade`: creates, re-runs as a no-op, adopts a foreign scans table."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text

from scanqueue.config import normalize_database_url
from scanqueue.db.migrate import head_revision, upgrade
from scanqueue.db.schema import metadata
from scanqueue.db.store import Store, store_for


def test_upgrade_creates_every_table_and_is_idempotent(db_url: str) -> None:
    store = store_for(normalize_database_url(db_url))
    before, after = upgrade(store)
    assert before is None and after == head_revision()
    assert upgrade(store) == (after, after)
    tables = set(inspect(store.engine).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= tables
    assert "scanqueue_alembic_version" in tables and "alembic_version" not in tables


def test_upgrade_matches_the_metadata(db_url: str) -> None:
    """The migrations and schema.py describe the same columns."""
    store = store_for(normalize_database_url(db_url))
    upgrade(store)
    insp = inspect(store.engine)
    for table in metadata.sorted_tables:
        assert {c["name"] for c in insp.get_columns(table.name)} == set(table.c.keys()), table.name
    indexes = {i["name"] for i in insp.get_indexes("scans")}
    assert {"scans_claim_order_idx", "scans_running_heartbeat_idx"} <= indexes


def test_upgrade_adopts_an_existing_scans_table(db_url: str) -> None:
    url = normalize_database_url(db_url)
    engine = create_engine(url)
    jsontype = "jsonb" if url.startswith("postgresql") else "text"
    ts = "timestamptz" if url.startswith("postgresql") else "timestamp"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE scans (id text PRIMARY KEY, status text NOT NULL,"
                f" providers_scanned {jsontype}, frameworks_scanned {jsontype},"
                f" triggered_by_user text, triggered_by_token text, created_at {ts},"
                f" started_at {ts}, finished_at {ts}, error text,"
                f" findings_count integer DEFAULT 0, attempts integer DEFAULT 0, owner_note text)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, owner_note)"
                " VALUES ('old', 'completed', '[\"aws\"]', '[]', 'kept')"
            )
        )
    engine.dispose()
    store = Store(url)
    upgrade(store)
    cols = {c["name"] for c in inspect(store.engine).get_columns("scans")}
    assert {"owner_note", "dispatched_at", "heartbeat_at", "worker_id", "dispatch_count"} <= cols
    with store.engine.begin() as conn:
        assert (
            conn.execute(text("SELECT owner_note FROM scans WHERE id='old'")).scalar_one() == "kept"
        )
    assert store.get("old").status == "completed"


def test_postgres_trigger_notifies_on_plain_insert(pg_url: str) -> None:
    import select

    import psycopg2

    store = store_for(normalize_database_url(pg_url))
    upgrade(store)
    listener = psycopg2.connect(pg_url)
    listener.autocommit = True
    with listener.cursor() as cur:
        cur.execute("LISTEN scanqueue_scans")
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " VALUES ('n1', 'queued', '[\"aws\"]', '[\"soc2\"]')"
            )
        )
    assert select.select([listener], [], [], 5)[0]
    listener.poll()
    assert [n.channel for n in listener.notifies] == ["scanqueue_scans"]
    listener.close()


def test_downgrade_for_a_rollback_keeps_scans(db_url: str) -> None:
    from scanqueue.db.migrate import current_revision, downgrade

    store = store_for(normalize_database_url(db_url))
    upgrade(store)
    store.enqueue(["aws"], ["soc2"], scan_id="keep-me")
    assert downgrade(store, "0001") == (head_revision(), "0001")
    assert inspect(store.engine).has_table("findings")  # possibly adopted: never dropped
    with store.engine.connect() as conn:  # read as the rolled-back code would
        kept = conn.execute(text("SELECT status FROM scans WHERE id = 'keep-me'"))
        assert kept.scalar_one() == "queued"
    assert current_revision(store) == "0001"
    upgrade(store)
    assert current_revision(store) == head_revision()
    assert store.get("keep-me").status == "queued"
