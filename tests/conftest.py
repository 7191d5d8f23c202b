"""Fixtures against real services: the machine's PostgreSQL, throwaway Redis servers,
and real `celery -A scanqueue worker` / `scanqueue bridge` processes.

A service that is missing skips its tests locally, but fails them when CI is set.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Re-exported: the test modules import these from here.
from tests.support import Proc as Proc
from tests.support import RedisServer as RedisServer
from tests.support import WaitTimeout as WaitTimeout
from tests.support import _ping
from tests.support import create_pg_database as _create_pg_database
from tests.support import drop_pg_database as _drop_pg_database
from tests.support import free_port as free_port
from tests.support import wait_for as wait_for

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "SCANQUEUE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MACHINE_REDIS_URL = os.environ.get("SCANQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("SCANQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
IN_CI = bool(os.environ.get("CI"))
BIN = Path(sys.executable).parent


def service_missing(what: str) -> None:
    """Skip locally; fail loudly in CI, where every service must be there."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not reachable", pytrace=False)
    pytest.skip(f"{what} not reachable")


# -- PostgreSQL ----------------------------------------------------------------------


def _pg_admin() -> Any:
    import psycopg2

    try:
        conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
    except psycopg2.OperationalError:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL}")
    conn.autocommit = True
    return conn


def create_pg_database(base_url: str = PG_ADMIN_URL) -> str:
    return _create_pg_database(base_url)


def drop_pg_database(url: str, base_url: str = PG_ADMIN_URL) -> None:
    _drop_pg_database(url, base_url)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (postgresql:// URL as platforms hand out)."""
    _pg_admin().close()
    url = create_pg_database()
    yield url
    from scanqueue.db.store import _stores

    for key in [k for k in _stores if k[1].endswith("/" + url.rsplit("/", 1)[1])]:
        _stores.pop(key).dispose()
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'scans.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'scans.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def upgrade(url: str) -> None:
    from scanqueue.config import normalize_database_url
    from scanqueue.db.migrate import upgrade as run_upgrade
    from scanqueue.db.store import store_for

    run_upgrade(store_for(normalize_database_url(url)))


@pytest.fixture
def store(db_url: str) -> Any:
    """A migrated Store on each database."""
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import store_for

    upgrade(db_url)
    return store_for(normalize_database_url(db_url))


# -- Redis ---------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        service_missing("redis-server")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def machine_redis_url() -> str:
    import redis

    if not _ping(redis.Redis.from_url(MACHINE_REDIS_URL, socket_timeout=2)):
        service_missing(f"Redis at {MACHINE_REDIS_URL}")
    return MACHINE_REDIS_URL


@pytest.fixture
def rabbitmq_url() -> str:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", 5672))
        except OSError:
            service_missing("RabbitMQ at 127.0.0.1:5672")
    return RABBITMQ_URL


# -- processes -----------------------------------------------------------------------


def base_env(database_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SCANQUEUE_", "CELERY_", "REDIS_URL", "DATABASE_URL", "OPENLINEAGE"))
    }
    env.update(
        DATABASE_URL=database_url,
        SCANQUEUE_QUEUE=f"sq-test-{uuid.uuid4().hex[:8]}",
        SCANQUEUE_CONNECT_TIMEOUT="15",
        SCANQUEUE_METRICS_ADDR="127.0.0.1",
        SCANQUEUE_TEST_JOURNAL=str(tmp_path / "journal.jsonl"),
        PYTHONPATH=str(REPO),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        AUTOSCALE_KEEPALIVE=env.get("AUTOSCALE_KEEPALIVE", "5"),
        CELERY_SOFT_SHUTDOWN_TIMEOUT="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def start_worker(
    procs: list[Proc], env: dict[str, str], cwd: Path, *extra: str, ready: bool = True
) -> Proc:
    args = [
        str(BIN / "celery"),
        "-A",
        "scanqueue",
        "worker",
        "-l",
        "info",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"w{uuid.uuid4().hex[:6]}@%h",
        *extra,
    ]
    proc = Proc(args, env, cwd, "worker")
    procs.append(proc)
    if ready:
        proc.wait_for_output("ready.", timeout=60)
    return proc


def start_bridge(procs: list[Proc], env: dict[str, str], cwd: Path) -> Proc:
    proc = Proc([str(BIN / "scanqueue"), "bridge"], env, cwd, "bridge")
    procs.append(proc)
    proc.wait_for_output("bridge running", timeout=60)
    return proc


def run_cli(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "scanqueue"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_journal(tmp_path: Path) -> list[dict[str, Any]]:
    import json

    path = tmp_path / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_no_overlaps(journal: list[dict[str, Any]]) -> None:
    """No scan has two runs whose [start, end] intervals overlap."""
    runs: dict[str, list[tuple[float, float]]] = {}
    open_runs: dict[tuple[str, int, int], float] = {}
    for e in journal:
        key = (e["scan_id"], e["attempt"], e["pid"])
        if e["kind"] == "start":
            open_runs[key] = e["t"]
        elif e["kind"] == "end" and key in open_runs:
            runs.setdefault(e["scan_id"], []).append((open_runs.pop(key), e["t"]))
    for key, start in open_runs.items():  # killed runs: open-ended up to their start
        runs.setdefault(key[0], []).append((start, start))
    for scan_id, intervals in runs.items():
        intervals.sort()
        for (s1, e1), (s2, _e2) in itertools.pairwise(intervals):
            assert s2 >= e1, f"scan {scan_id} ran twice at once: {intervals}"


# -- a throwaway PostgreSQL server (for restart tests) ------------------------------------


class PgServer:
    """initdb + pg_ctl as user postgres, on a free loopback port."""

    def __init__(self) -> None:
        import tempfile

        self.port = free_port()
        # Not under pytest's tmp_path: that is private to root, and postgres must enter it.
        self.base = Path(tempfile.mkdtemp(prefix="scanqueue-pg-"))
        os.chmod(self.base, 0o755)
        self.datadir = self.base / "pgdata"
        self.sockdir = self.base / "pgsock"
        self.logfile = self.base / "pg.log"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120
        )

    def init(self) -> None:
        if shutil.which("initdb") is None or shutil.which("runuser") is None:
            service_missing("initdb/pg_ctl (PostgreSQL server binaries)")
        for d in (self.datadir, self.sockdir):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "postgres", "postgres")
        self.logfile.touch()
        shutil.chown(self.logfile, "postgres", "postgres")
        self._as_postgres(
            "initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync"
        )

    def start(self) -> None:
        self._as_postgres(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(
                "pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"
            )

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    server.init()
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(server.base, ignore_errors=True)


def insert_rows(url: str, ids: list[str]) -> None:
    """INSERT queued rows the way another program does."""
    from sqlalchemy import create_engine, text

    from scanqueue.config import normalize_database_url

    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " VALUES (:id, 'queued', '[\"aws\"]', '[\"soc2\"]')"
            ),
            [{"id": i} for i in ids],
        )
    engine.dispose()


def scan_rows(url: str) -> dict[str, dict[str, Any]]:
    from sqlalchemy import create_engine, text

    from scanqueue.config import normalize_database_url

    engine = create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        result = {
            r.id: dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT id, status, attempts, created_at, started_at, finished_at, error FROM scans"
                )
            )
        }
    engine.dispose()
    return result


def all_finished(url: str, n: int) -> bool:
    found = scan_rows(url)
    return len(found) == n and all(
        r["status"] in ("completed", "failed", "canceled") for r in found.values()
    )


def sql(url: str, statement: str, params: Any = None) -> list[Any]:
    """One plain-SQL statement (``params``: a dict, or a list for many), its rows if any."""
    from sqlalchemy import create_engine, text

    from scanqueue.config import normalize_database_url

    engine = create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params or {})
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


def report(what: str, value: float, unit: str = "s") -> None:
    """A measured figure, printed for ``-s`` runs and the issue notes."""
    print(f"\nMEASURED {what}: {value:.2f}{unit}")
