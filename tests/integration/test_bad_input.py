"""Bad input, tried as a new user would: each answers one clear line, never a traceback.

Issue 15, items 1, 4, 5, 6 and 7: passwords masked in every message however
malformed the URL; a non-numeric port; unknown migration revisions and relative
downgrades; a bridge that cannot reach Redis at start; unknown ``SCANQUEUE_*``
variables; rows whose status scanqueue does not know; one validator for the CLI
and the API.  Everything runs against the real databases, Redis and processes.
"""

from __future__ import annotations

import json
import logging
import random
import string
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from scanqueue.api.app import create_app
from scanqueue.config import (
    KNOWN_VARIABLES,
    Settings,
    mask_url,
    normalize_database_url,
    unknown_variable_warnings,
)
from scanqueue.db.store import Store
from scanqueue.errors import ConfigError, MalformedRowError
from scanqueue.observe.metrics import UnknownStatusWatch
from scanqueue.runners.api import Job
from tests.conftest import BIN, Proc, base_env, free_port, run_cli, upgrade
from tests.integration.test_store import insert_raw

# -- 1. passwords masked however malformed the URL -------------------------------------------

SPECIALS = "/#?@:%&=+ ;[]!$'*,~"
SHAPES = (
    "postgresql://user:{pw}@127.0.0.1:5432/db",
    "postgresql://user:{pw}@127.0.0.1:abc/db",
    "postgres://user:{pw}@db.example.com/app?sslmode=require",
    "postgresql+psycopg2://user:{pw}@[::1]:5432/db",
    "redis://:{pw}@host:6379/0",
    "redis://{pw}@host:6379/0",
    "rediss://default:{pw}@host:6380/0?ssl_cert_reqs=none",
    "redis://:{pw}@host:notaport/0",
    "amqp://guest:{pw}@rabbit:5672//",
    "sqla+postgresql://u:{pw}@h/db",
    "redis://:{pw}@",
    "postgresql://u:{pw}@h/db#frag",
    "postgresql:u:{pw}@h/db",
    "redis://h:6379/0?password={pw}",
)


def _passwords(n: int, seed: int = 15) -> list[str]:
    """Random passwords that mix URL-breaking characters into a unique core."""
    rng = random.Random(seed)
    out = ["pa/ss#w?rdQ7", "p@ss/w#rdK9", "xJ:y@zW4", "?#/@Vv8", "%40%2FTq6", "aR b\ncU2"]
    for _ in range(n):
        core = "".join(rng.choice(string.ascii_letters) for _ in range(6))
        noise = "".join(rng.choice(SPECIALS) for _ in range(rng.randint(0, 6)))
        cut = rng.randint(0, len(noise))
        out.append(noise[:cut] + core + noise[cut:])
    return out


def _leaks(shown: str, password: str) -> bool:
    """Whether the password's distinctive part shows (special characters alone prove
    nothing: ``/`` and ``:`` are in every URL)."""
    core = "".join(c for c in password if c.isalnum())
    return bool(core) and core in "".join(c for c in shown if c.isalnum())


def test_mask_url_never_shows_a_password_whatever_it_holds() -> None:
    tried = 0
    for password in _passwords(400):
        for shape in SHAPES:
            if shape.startswith("redis://{pw}@") and ":" in password:
                continue  # "redis://a:b@" is user a, password b: nothing to tell them apart
            raw = shape.format(pw=password)
            shown = mask_url(raw)
            tried += 1
            assert not _leaks(shown.replace("password=***", ""), password), (raw, shown)
            assert "\n" not in shown
    assert tried > 5000


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("redis://:pa/ss#w?rd@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://u:p@ss/w#rd@127.0.0.1:abc/db", "postgresql://u:***@127.0.0.1:abc/db"),
        ("redis://secret@host/0", "redis://***@host/0"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("redis://h/0?db=1&password=x&db=2", "redis://h/0?db=1&password=***"),
        ("redis://h:6379/0?password=~&[@KtJRlg", "redis://h:***"),
    ],
)
def test_mask_url_examples(raw: str, shown: str) -> None:
    assert mask_url(raw) == shown


def test_every_url_variable_refuses_or_accepts_without_showing_the_password() -> None:
    for password in _passwords(60, seed=7):
        for shape in SHAPES:
            if shape.startswith("redis://{pw}@") and ":" in password:
                continue  # user "a", password "b" (see above)
            raw = shape.format(pw=password)
            for variable in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
                try:
                    Settings.from_env({variable: raw})
                except ConfigError as exc:
                    text = str(exc)
                    assert text.startswith(f"{variable}: ") and "\n" not in text
                    assert not _leaks(text.replace("password=***", ""), password), (raw, text)


def test_malformed_urls_are_one_masked_line_from_the_cli(tmp_path: Path) -> None:
    cases = {
        "REDIS_URL": "redis://:pa/ss#w?rd@host:6379/0",
        "DATABASE_URL": "postgresql://u:p@ss/w#rd@127.0.0.1:abc/db",
        "CELERY_BROKER_URL": "redis://:Hunter2/x@host:port/0",
    }
    for variable, raw in cases.items():
        env = base_env(f"sqlite:///{tmp_path}/x.db", tmp_path, **{variable: raw})
        out = run_cli(env, "list")
        assert out.returncode == 1, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert line.startswith(f"scanqueue: {variable}: ")
        for secret in ("pa/ss", "ss#w", "w#rd", "Hunter2"):
            assert secret not in line


# -- 4. one clear line, never a traceback -----------------------------------------------------

BAD_PORT_URL = "postgresql://u:secretpw@127.0.0.1:abc/db"


def test_non_numeric_database_port_is_one_line_for_the_cli_and_the_worker(
    tmp_path: Path, procs: list[Proc]
) -> None:
    env = base_env(BAD_PORT_URL, tmp_path)
    for args in (["list"], ["db", "upgrade"], ["bridge"], ["serve"]):
        out = run_cli(env, *args)
        assert out.returncode == 1, (args, out.stderr)
        [line] = out.stderr.strip().splitlines()
        assert line.startswith("scanqueue: DATABASE_URL: the port must be a number"), line
        assert "secretpw" not in line and "Traceback" not in out.stderr
    worker = Proc([str(BIN / "celery"), "-A", "scanqueue", "worker"], env, tmp_path, "worker")
    procs.append(worker)
    assert worker.proc.wait(60) == 1
    [line] = worker.output().strip().splitlines()
    assert line.startswith("scanqueue: DATABASE_URL: the port must be a number"), line
    assert "secretpw" not in line


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    upgrade(db_url)
    return base_env(db_url, tmp_path)


def test_downgrade_wants_an_explicit_known_revision_and_yes(env: dict[str, str]) -> None:
    current = run_cli(env, "db", "current").stdout
    unknown = run_cli(env, "db", "downgrade", "zzz")
    assert unknown.returncode == 1
    [line] = unknown.stderr.strip().splitlines()
    assert line.startswith("scanqueue: unknown revision 'zzz': expected one of base, 0001")
    for relative in ("-1", "head-1", "0002@-1", "+1"):
        out = run_cli(env, "db", "downgrade", "--", relative)
        assert out.returncode == 1, (relative, out.stderr)
        [line] = out.stderr.strip().splitlines()
        assert "relative steps are not accepted" in line
    # A bare -1 is not even taken as a revision: click calls it an unknown option (usage).
    assert run_cli(env, "db", "downgrade", "-1").returncode == 2
    unconfirmed = run_cli(env, "db", "downgrade", "0001")
    assert unconfirmed.returncode == 1
    [line] = unconfirmed.stderr.strip().splitlines()
    assert "add --yes" in line
    assert run_cli(env, "db", "current").stdout == current  # nothing changed
    bad_upgrade = run_cli(env, "db", "upgrade", "--revision", "zzz")
    assert bad_upgrade.returncode == 1 and len(bad_upgrade.stderr.strip().splitlines()) == 1
    done = run_cli(env, "db", "downgrade", "0001", "--yes")
    assert done.returncode == 0, done.stderr
    assert "downgraded from" in done.stdout and "to 0001" in done.stdout
    again = run_cli(env, "db", "downgrade", "0001")  # already there: nothing to do, no --yes
    assert again.returncode == 0 and "nothing to downgrade" in again.stdout
    assert run_cli(env, "db", "upgrade").returncode == 0


# -- 5. the bridge's start is bounded too -------------------------------------------------------


def test_bridge_gives_up_on_unreachable_redis_after_the_connect_timeout(
    sqlite_url: str, tmp_path: Path
) -> None:
    upgrade(sqlite_url)
    dead = f"redis://:redispw@127.0.0.1:{free_port()}/0"
    env = base_env(sqlite_url, tmp_path, REDIS_URL=dead, SCANQUEUE_CONNECT_TIMEOUT="3")
    started = time.monotonic()
    bridge = Proc([str(BIN / "scanqueue"), "bridge"], env, tmp_path, "bridge")
    try:
        code = bridge.proc.wait(30)
    finally:
        bridge.stop()
    elapsed = time.monotonic() - started
    output = bridge.output()
    assert code == 1, output
    assert 2.5 < elapsed < 25, elapsed
    assert output.count("waiting for Redis") >= 2, output  # each attempt logged
    last = output.strip().splitlines()[-1]
    assert last.startswith("scanqueue: giving up after 3s: cannot reach REDIS_URL"), last
    assert "redispw" not in output and "Traceback" not in output


# -- 6. unknown variables and unknown statuses -------------------------------------------------


def test_unknown_variables_name_the_closest_known_one() -> None:
    lines = unknown_variable_warnings(
        {
            "SCANQUEUE_MAX_WORKERS": "8",
            "SCANQUEUE_CONCURENCY": "2",
            "SCANQUEUE_API_TOKN": "x",
            "SCANQUEUE_RUNNER": "a:b",  # known
            "SCANQUEUE_TEST_JOURNAL": "/x",  # the test suite's own
            "OTHER": "1",
        }
    )
    assert lines == [
        "warning: unknown variable SCANQUEUE_API_TOKN is ignored"
        " (did you mean SCANQUEUE_API_TOKEN?)",
        "warning: unknown variable SCANQUEUE_CONCURENCY is ignored"
        " (did you mean SCANQUEUE_CONCURRENCY?)",
        "warning: unknown variable SCANQUEUE_MAX_WORKERS is ignored"
        " (did you mean SCANQUEUE_MAX_CONCURRENCY?)",
    ]
    assert "SCANQUEUE_API_INSECURE" in KNOWN_VARIABLES


def test_every_entry_point_warns_about_an_unknown_variable(
    env: dict[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    env = {**env, "SCANQUEUE_MAX_WORKERS": "8"}
    needle = "unknown variable SCANQUEUE_MAX_WORKERS is ignored (did you mean"
    out = run_cli(env, "list")
    assert out.returncode == 0 and out.stderr.count(needle) == 1, out.stderr
    # serve and bridge are CLI commands: the same group callback warns before they run.
    serve = run_cli({**env, "PORT": "1"}, "serve", "--host", "0.0.0.0")
    assert serve.returncode == 1 and needle in serve.stderr
    # The Celery app (what `celery -A scanqueue worker` loads) warns on import.
    report = Proc([str(BIN / "celery"), "-A", "scanqueue", "report"], env, tmp_path, "report")
    procs.append(report)
    assert report.proc.wait(60) == 0
    assert report.output().count(needle) == 1, report.output()[-2000:]


def _insert_with_status(store: Store, scan_id: str, status: str) -> None:
    """Another program's row, with a status scanqueue does not know."""
    from sqlalchemy import text

    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " VALUES (:id, :status, '[\"aws\"]', '[]')"
            ),
            {"id": scan_id, "status": status},
        )


def test_rows_of_unknown_status_are_counted_and_warned_about_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    insert_raw(store, "good")
    _insert_with_status(store, "shouty", "QUEUED")
    _insert_with_status(store, "odd", "pending")
    watch = UnknownStatusWatch(store, every_s=0)
    with caplog.at_level(logging.WARNING, logger="scanqueue.observe.metrics"):
        watch.tick()
        watch.tick()
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 2, warned  # once per row, not once per tick
    assert any("shouty" in w and "'QUEUED'" in w for w in warned)
    with TestClient(create_app(Settings.from_env({"DATABASE_URL": store.database_url}))) as c:
        metrics = c.get("/metrics").text
    assert 'scanqueue_scans{status="unknown"} 2.0' in metrics
    assert 'scanqueue_scans{status="queued"} 1.0' in metrics


def test_queue_command_shows_depth_per_status_with_unknown(env: dict[str, str]) -> None:
    from scanqueue.db.store import store_for

    store = store_for(normalize_database_url(env["DATABASE_URL"]))
    insert_raw(store, "q1")
    insert_raw(store, "q2")
    _insert_with_status(store, "x1", "QUEUED")
    out = run_cli(env, "queue", "--json")
    assert out.returncode == 0, out.stderr
    snapshot = json.loads(out.stdout)
    assert snapshot["depth"] == 2
    assert snapshot["statuses"] == {
        "queued": 2,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "canceled": 0,
        "unknown": 1,
    }
    assert snapshot["unknown_statuses"] == {"QUEUED": 1}
    assert snapshot["unknown_rows"] == [{"id": "x1", "status": "QUEUED"}]
    human = run_cli(env, "queue")
    assert human.returncode == 0 and "unknown    1" in human.stdout
    assert "'QUEUED': 1" in human.stderr


def test_a_bridge_warns_about_a_row_of_unknown_status(
    env: dict[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    from scanqueue.db.store import store_for

    store = store_for(normalize_database_url(env["DATABASE_URL"]))
    _insert_with_status(store, "stranded", "QUEUED")
    bridge = Proc([str(BIN / "scanqueue"), "bridge"], env, tmp_path, "bridge")
    procs.append(bridge)
    bridge.wait_for_output("scan stranded has status 'QUEUED'", timeout=60)


# -- 7. one validator; malformed stored data said as it is --------------------------------------


def test_the_cli_refuses_what_the_api_refuses_for_the_same_reason(
    env: dict[str, str], migrated_client: TestClient
) -> None:
    cases: list[tuple[list[str], dict[str, Any], str]] = [
        (["--provider", "a" * 100_000], {"providers": ["a" * 100_000]}, "at most 200 characters"),
        (["--provider", "  "], {"providers": ["  "]}, "must be a non-empty string"),
        (
            ["--provider", "aws", "--user", "u" * 201],
            {"providers": ["aws"], "user": "u" * 201},
            "at most 200 chars",
        ),
        (["--provider", "a\x1bb"], {"providers": ["a\x1bb"]}, "control characters"),
        (
            ["--provider", "aws", "--framework", ""],
            {"providers": ["aws"], "frameworks": [""]},
            "frameworks[0]",
        ),
    ]
    for args, body, reason in cases:
        out = run_cli(env, "enqueue", *args)
        assert out.returncode == 2, out.stderr
        assert reason in out.stderr
        response = migrated_client.post("/api/v1/scans", json=body)
        assert response.status_code == 422
        assert reason in json.dumps(response.json())
    too_many = run_cli(env, "enqueue", *[a for i in range(101) for a in ("--provider", f"p{i}")])
    assert too_many.returncode == 2 and "at most 100 items" in too_many.stderr
    assert json.loads(run_cli(env, "list", "--json").stdout) == []


@pytest.fixture
def migrated_client(env: dict[str, str]) -> Any:
    settings = Settings.from_env({"DATABASE_URL": env["DATABASE_URL"]})
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


def test_a_provider_column_holding_a_json_string_says_so(store: Store) -> None:
    from tests.integration.test_execute import run

    insert_raw(store, "str", providers='"aws"')
    run(store, "str", lambda job, ctx: None)
    row = store.get("str")
    assert row.status == "failed"
    assert row.error is not None
    assert "providers_scanned: expected a JSON array of strings, got a string" in row.error
    assert "not valid JSON" not in row.error
    with pytest.raises(MalformedRowError, match="got an object"):
        Job.from_stored("x", '{"a": 1}', "[]")
    with pytest.raises(MalformedRowError, match="got a number at index 1"):
        Job.from_stored("x", '["a", 2]', "[]")


def test_providers_list_shows_a_malformed_config_as_it_is(store: Store) -> None:
    from sqlalchemy import text

    from scanqueue.runners.store import RunnerStore

    RunnerStore(store)  # the providers table exists after upgrade
    stored = '"just a string"' if store.dialect == "postgresql" else "{not json"
    with store.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO providers (name, kind, config, enabled) VALUES ('b', 'x', :c, true)"),
            {"c": stored},
        )
    from click.testing import CliRunner

    from scanqueue.cli.main import cli

    result = CliRunner().invoke(
        cli, ["providers", "list", "--json"], env={"DATABASE_URL": store.database_url}
    )
    assert result.exit_code == 0, result.output
    [provider] = json.loads(result.stdout)
    expected = "just a string" if store.dialect == "postgresql" else "{not json"
    assert provider["config"] == expected  # not {}


def test_honcho_is_an_extra_the_docs_name() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    procfile = project["optional-dependencies"]["procfile"]
    assert any(dep.startswith("honcho") for dep in procfile)
    deployment = (root / "docs" / "deployment.md").read_text()
    assert "pip install 'scanqueue[procfile]'" in deployment
