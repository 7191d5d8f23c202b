"""Real processes and throwaway servers, for the tests and the benchmarks alike.

No pytest here: ``tests/conftest.py`` turns a missing service into a skip (or,
in CI, a failure); ``bench/`` uses the same helpers directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not come true in time (an assertion failure in tests)."""


# Ports handed out below Linux's ephemeral range (32768+), so no outgoing connection can
# take one between free_port() and the server's bind; each pytest-xdist worker walks its own
# block, so two test processes never pick the same port either.
_PORT_BASE = 20000
_PORT_BLOCK = 1000
_PORT_BLOCKS = 12
_port_cursor: list[int] = []


def _port_block_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    return _PORT_BASE + (index % _PORT_BLOCKS) * _PORT_BLOCK


def free_port() -> int:
    start = _port_block_start()
    if not _port_cursor:
        # A random start, so a re-run does not meet the last run's ports in TIME_WAIT.
        _port_cursor.append(int.from_bytes(os.urandom(2), "big") % _PORT_BLOCK)
    for _ in range(_PORT_BLOCK):
        port = start + _port_cursor[0]
        _port_cursor[0] = (_port_cursor[0] + 1) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + _PORT_BLOCK - 1}")


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def create_pg_database(base_url: str, prefix: str = "sq_test_") -> str:
    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(base_url, connect_timeout=3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str, base_url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    with contextlib.suppress(Exception):
        conn = psycopg2.connect(base_url, connect_timeout=3)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


class RedisServer:
    """A throwaway redis-server on a free loopback port (FLUSHALL/restart tests use it)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        wait_for(lambda: _ping(client), 10, what="redis-server")

    def version(self) -> str:
        import redis

        return str(redis.Redis(host="127.0.0.1", port=self.port).info()["redis_version"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class Proc:
    """A scanqueue process in its own process group, with its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.args = args
        self.name = name
        self.env = env
        self.cwd = cwd
        self.log_path = cwd / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        wait_for(
            lambda: text in self.output() or self.proc.poll() is not None, timeout, what=repr(text)
        )
        if text not in self.output():
            raise AssertionError(
                f"process exited ({self.proc.returncode}) before {text!r}:\n{self.output()[-4000:]}"
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 8) -> int | None:
        # SIGTERM to the main process only: signalling the whole group kills pool
        # processes that may hold billiard's queue lock, and the worker then hangs.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(10)
        # Pool children may linger a moment after their parent.
        self.signal_group(signal.SIGKILL)
        self._log.close()
        return self.proc.returncode
