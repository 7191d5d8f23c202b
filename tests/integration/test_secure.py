"""Secure by default (issue 15, items 2 and 3): an API that refuses what it should, a
``serve`` that will not listen beyond loopback without a token, and a worker whose
secrets its scanners cannot read.

The API runs under starlette's TestClient where the request shape is the point
(415, 413, 400, 422, 403) and on a real uvicorn server for the event-stream cap;
``serve`` and the worker's processes are real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from scanqueue.api.app import create_app
from scanqueue.cli.main import cli
from scanqueue.config import Settings, normalize_database_url
from scanqueue.runners.api import ScanContext
from scanqueue.runners.providers.base import masked_config
from scanqueue.runners.providers.sarif_command import SarifCommandProvider
from tests.conftest import BIN, Proc, base_env, free_port, run_cli, upgrade, wait_for
from tests.integration.conftest import api_settings
from tests.integration.test_web import LiveServer, SSEClient

TOKEN = "s3cure-api-token"
JSON = {"Content-Type": "application/json"}
ENVDUMP = Path(__file__).resolve().parents[1] / "fixtures" / "sarif" / "envdump.py"


@pytest.fixture
def client(migrated: str) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(migrated)), base_url="http://127.0.0.1:8000") as c:
        yield c


def _count(client: TestClient) -> int:
    return len(client.get("/api/v1/scans").json()["scans"])


# -- 2. bodies --------------------------------------------------------------------------------


def test_a_body_must_be_json_by_content_type(client: TestClient) -> None:
    body = json.dumps({"providers": ["aws"]})
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/jsonx"):  # fmt: skip
        headers = {"Content-Type": content_type} if content_type else {}
        response = client.post("/api/v1/scans", content=body, headers=headers)
        assert response.status_code == 415, (content_type, response.text)
    ok = client.post(
        "/api/v1/scans", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert ok.status_code == 201
    assert _count(client) == 1


def test_bodies_over_one_mib_are_refused_also_when_chunked(client: TestClient) -> None:
    big = json.dumps({"providers": ["aws"], "user": "x" * (1024 * 1024)}).encode()
    assert client.post("/api/v1/scans", content=big, headers=JSON).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    chunked = client.post("/api/v1/scans", content=chunks(), headers=JSON)
    assert chunked.status_code == 413
    lying = client.post("/api/v1/scans", content=chunks(), headers={**JSON, "Content-Length": "10"})
    assert lying.status_code in (400, 413)  # never more than the limit is read
    assert _count(client) == 0


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"\xff\xfe\x00",
        b'{"providers": ["aws"]',
        b"NaN",
        b'{"providers": ["aws"], "user": -Infinity}',
        b"   ",
    ],
)
def test_invalid_json_however_deep_is_400_never_500(client: TestClient, body: bytes) -> None:
    response = client.post("/api/v1/scans", content=body, headers=JSON)
    assert response.status_code == 400, (body[:40], response.text)
    assert "Traceback" not in response.text and response.json()["error"]


def test_valid_json_with_bad_fields_is_422(client: TestClient) -> None:
    deep_but_valid = {"providers": ["aws"], "labels": json.loads("[" * 500 + "]" * 500)}
    for body in (
        deep_but_valid,
        {"providers": "aws"},
        {"providers": [["aws"]]},
        {"providers": ["aws"], "user": {"name": "x"}},
        "just a string",
        None,
        [],
        3,
    ):
        content = json.dumps(body).encode()
        response = client.post("/api/v1/scans", content=content, headers=JSON)
        assert response.status_code == 422, (body, response.text)


# -- 2. writes from foreign names without a token ---------------------------------------------


def test_without_a_token_writes_need_loopback_host_and_origin(migrated: str) -> None:
    app = create_app(api_settings(migrated))
    body = {"providers": ["aws"]}
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for host in ("evil.example", "127.0.0.1.evil.example", "localhost:8000@evil", "10.0.0.5"):
            r = c.post("/api/v1/scans", json=body, headers={"Host": host})
            assert r.status_code == 403, host
        for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
            r = c.post("/api/v1/scans", json=body, headers={"Origin": origin})
            assert r.status_code == 403, origin
        # The cross-site form of the issue: text/plain from another origin.
        r = c.post(
            "/api/v1/scans",
            content=json.dumps(body),
            headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        )
        assert r.status_code == 403
        for host, origin in (
            ("localhost:8000", "http://localhost:8000"),
            ("127.0.0.1", "http://127.0.0.1:3000"),
            ("[::1]:8000", "http://[::1]:8000"),
        ):
            r = c.post("/api/v1/scans", json=body, headers={"Host": host, "Origin": origin})
            assert r.status_code == 201, (host, origin, r.text)
        scan_id = c.get("/api/v1/scans").json()["scans"][0]["id"]
        assert (
            c.post(f"/api/v1/scans/{scan_id}/cancel", headers={"Host": "evil"}).status_code == 403
        )
        # Reads are not writes: a foreign Host may read (the bearer token guards those).
        assert c.get("/api/v1/scans", headers={"Host": "evil.example"}).status_code == 200
        assert len(c.get("/api/v1/scans").json()["scans"]) == 3
    # With a token the bearer check guards writes, whatever the Host (a platform's name).
    with TestClient(create_app(api_settings(migrated, SCANQUEUE_API_TOKEN=TOKEN))) as c:
        auth = {"Authorization": f"Bearer {TOKEN}", "Host": "scanqueue.example.com"}
        assert c.post("/api/v1/scans", json=body, headers=auth).status_code == 201
        assert c.post("/api/v1/scans", json=body, headers={"Host": "x"}).status_code == 401


def test_healthz_says_nothing_about_hosts(migrated: str) -> None:
    dead_redis = f"redis://:redispw@127.0.0.1:{free_port()}/0"
    with TestClient(create_app(api_settings(migrated, REDIS_URL=dead_redis))) as c:
        response = c.get("/healthz")
    assert response.status_code == 503
    doc = response.json()
    assert doc["status"] == "unavailable"
    assert doc["checks"] == {"database": "ok", "redis": "unavailable"}
    for leak in ("127.0.0.1", "redis://", "redispw", "refused", "Error"):
        assert leak not in response.text


def test_event_subscribers_are_capped(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    settings = api_settings(normalize_database_url(sqlite_url), SCANQUEUE_SSE_MAX_SUBSCRIBERS="2")
    assert Settings.from_env({}).sse_max_subscribers == 100  # the default
    with LiveServer(settings, heartbeat_s=0.5) as server:
        first, second = SSEClient(server.url), SSEClient(server.url)
        assert first.subscribed.wait(10) and second.subscribed.wait(10)
        refused = httpx.get(f"{server.url}/api/v1/events", timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        first.close()
        state = server.app.state.scanqueue
        wait_for(lambda: state.subscribers == 1, 10, what="a slot back")
        third = SSEClient(server.url)
        assert third.subscribed.wait(10) and third.status == 200
        second.close()
        third.close()
        wait_for(lambda: state.subscribers == 0, 10, what="every slot back")


# -- 2. serve: secure by default, one line when it cannot -------------------------------------


@pytest.fixture
def serve_env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    upgrade(sqlite_url)
    return base_env(sqlite_url, tmp_path)


def test_serve_beyond_loopback_wants_a_token(
    serve_env: dict[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    for env, args in (
        ({**serve_env, "PORT": str(port)}, ["serve"]),  # a platform: $PORT means 0.0.0.0
        (serve_env, ["serve", "--host", "0.0.0.0", "--port", str(port)]),
        (serve_env, ["serve", "--host", "::", "--port", str(port)]),
        ({**serve_env, "SCANQUEUE_API_INSECURE": "false"}, ["serve", "--host", "0.0.0.0"]),
    ):
        out = run_cli(env, *args)
        assert out.returncode == 1, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert line.startswith("scanqueue: refusing to serve on "), line
        assert "SCANQUEUE_API_TOKEN" in line and "SCANQUEUE_API_INSECURE=true" in line
    bad = run_cli({**serve_env, "SCANQUEUE_API_INSECURE": "maybe"}, "serve")
    assert bad.returncode == 1 and "SCANQUEUE_API_INSECURE: expected true or false" in bad.stderr
    for extra in ({"SCANQUEUE_API_TOKEN": TOKEN}, {"SCANQUEUE_API_INSECURE": "true"}):
        port = free_port()
        env = {**serve_env, "PORT": str(port), **extra}
        proc = Proc([str(BIN / "scanqueue"), "serve"], env, tmp_path, "serve")
        procs.append(proc)
        proc.wait_for_output("Uvicorn running", timeout=30)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        proc.stop()


def test_serve_on_a_busy_port_is_one_line_and_exit_1(serve_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_cli(serve_env, "serve", "--port", str(port))
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == f"scanqueue: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not any("serving on" in line or "Traceback" in line for line in lines), lines


# -- 3. the scanner's environment and the worker's secrets ------------------------------------


class _Ctx(ScanContext):
    def __init__(self) -> None:
        pass

    @property
    def cancelled(self) -> bool:
        return False


def _env_names(config: dict[str, Any]) -> dict[str, str]:
    """Run envdump.py as a sarif-command provider; its findings name its variables."""
    provider = SarifCommandProvider("envdump", config)
    return {f.message or "": "" for f in provider.collect(_Ctx())}


def test_a_scanner_gets_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:dbpw@h/x")
    monkeypatch.setenv("REDIS_URL", "redis://:rpw@h/0")
    monkeypatch.setenv("HARMLESS_LOOKING", "1")
    monkeypatch.setenv("DSN_WITHOUT_A_SECRET_NAME", "postgresql://u:pw@h/x")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("SCANNER_TOKEN_SOURCE", "tok-from-worker-env")
    names = _env_names(
        {
            "command": [sys.executable, str(ENVDUMP)],
            "env": {"MODE": "strict", "TOKEN": {"from_env": "SCANNER_TOKEN_SOURCE"}},
        }
    )
    allowed = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP",
               "TMP", "SSL_CERT_FILE", "SSL_CERT_DIR", "MODE", "TOKEN", "PWD"}  # fmt: skip
    extra = {n for n in names if n not in allowed and not n.startswith("LC_")}
    # Python itself may add a few of its own (e.g. LC_CTYPE coercion): nothing else.
    assert extra <= {"PYTHONCOERCECLOCALE"}, extra
    assert {"PATH", "MODE", "TOKEN", "LC_ALL"} <= set(names)


def test_an_env_reference_to_a_missing_variable_fails_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    provider = SarifCommandProvider(
        "p", {"command": ["true"], "env": {"T": {"from_env": "NOT_SET_ANYWHERE"}}}
    )
    with pytest.raises(Exception, match=r"config.env.T reads \$NOT_SET_ANYWHERE, which is not set"):
        list(provider.collect(_Ctx()))
    for bad in ({"T": {"from_env": "1X"}}, {"T": {"from_env": "X", "extra": 1}}, {"T": 3},
                {"bad name": "x"}):  # fmt: skip
        with pytest.raises(Exception, match=r"config\.env"):
            SarifCommandProvider("p", {"command": ["true"], "env": bad})


def test_provider_env_secrets_are_never_printed_nor_taken_on_the_command_line(
    store: Any, tmp_path: Path
) -> None:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(cli, list(args), env={"DATABASE_URL": store.database_url})

    literal = {"command": ["scan"], "env": {"API_TOKEN": "tok-literal-secret"}}
    refused = invoke("providers", "add", "a", "--kind", "sarif-command", "--config",
                     json.dumps(literal))  # fmt: skip
    assert refused.exit_code == 1
    assert "from_env" in refused.stderr and "tok-literal-secret" not in refused.output
    config_file = tmp_path / "provider.json"
    config_file.write_text(json.dumps(literal))
    added = invoke("providers", "add", "a", "--kind", "sarif-command", "--config-file",
                   str(config_file), "--json")  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "tok-literal-secret" not in added.output
    reference = {"command": ["scan"], "env": {"API_TOKEN": {"from_env": "SCANNER_TOKEN"}}}
    by_ref = invoke("providers", "add", "b", "--kind", "sarif-command", "--config",
                    json.dumps(reference))  # fmt: skip
    assert by_ref.exit_code == 0, by_ref.output
    both = invoke("providers", "add", "c", "--kind", "sarif-command", "--config", "{}",
                  "--config-file", str(config_file))  # fmt: skip
    assert both.exit_code == 2
    listed = invoke("providers", "list", "--json")
    table = invoke("providers", "list")
    for out in (listed.output, table.output):
        assert "tok-literal-secret" not in out
    providers = {p["name"]: p for p in json.loads(listed.stdout)}
    assert providers["a"]["config"]["env"] == {"API_TOKEN": "***"}
    assert providers["b"]["config"]["env"] == {"API_TOKEN": {"from_env": "SCANNER_TOKEN"}}
    assert masked_config({"password": "x", "nested": {"api_key": "y"}, "n": 1}) == {
        "password": "***",
        "nested": {"api_key": "***"},
        "n": 1,
    }


NOBODY = 65534
# The venv's interpreter lives under /root here, which user nobody cannot enter.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable


def _as_nobody() -> None:
    os.setgid(NOBODY)
    os.setgroups([])
    os.setuid(NOBODY)


def _victim(tmp_path: Path, harden: bool) -> subprocess.Popen[str]:
    """A process of user nobody with a secret in its environment, hardened or not."""
    code = (
        "import sys, time\n"
        + (
            "from scanqueue.worker.harden import make_non_dumpable; make_non_dumpable()\n"
            if harden
            else ""
        )
        + "print('ready', flush=True); time.sleep(60)\n"
    )
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://u:victim-pw@h/db",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", code], env=env, cwd="/", stdout=subprocess.PIPE, text=True,
        preexec_fn=_as_nobody,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _read_environ_as_nobody(pid: int) -> str:
    code = (
        "import sys\n"
        "try:\n"
        f"    print(open('/proc/{pid}/environ','rb').read().decode('latin-1'))\n"
        "except OSError as exc:\n"
        "    print('DENIED', exc.errno)\n"
    )
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", code], capture_output=True, text=True, timeout=30, cwd="/",
        env={"PATH": os.environ["PATH"]}, preexec_fn=_as_nobody,
    )  # fmt: skip
    return out.stdout


def test_a_non_dumpable_worker_hides_its_environ_from_the_same_user(tmp_path: Path) -> None:
    """What a scanner (same user as its worker) can read: the honest check runs both as
    an unprivileged user, since root may read any process's environ regardless."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs Linux and root to switch to user nobody")
    plain = _victim(tmp_path, harden=False)
    try:
        seen = _read_environ_as_nobody(plain.pid)
        if "victim-pw" not in seen:
            pytest.skip(f"this system hides environ of same-user processes already: {seen!r}")
    finally:
        plain.kill()
        plain.wait()
        assert plain.stdout is not None
        plain.stdout.close()
    hardened = _victim(tmp_path, harden=True)
    try:
        seen = _read_environ_as_nobody(hardened.pid)
        assert "victim-pw" not in seen and seen.startswith("DENIED 13"), seen
        assert os.stat(f"/proc/{hardened.pid}/environ").st_uid == 0  # the kernel's doing
    finally:
        hardened.kill()
        hardened.wait()
        assert hardened.stdout is not None
        hardened.stdout.close()


def dumpable_runner(job: Any, ctx: Any) -> Any:
    """A runner that reports its pool process's dumpable flag as the findings count."""
    from scanqueue import ScanResult
    from scanqueue.worker.harden import is_dumpable

    return ScanResult(findings_count=10 + int(bool(is_dumpable())))


def test_the_worker_and_its_pool_processes_are_non_dumpable(
    sqlite_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """The Celery app makes the worker's main process non-dumpable when it loads, and a
    pool process running a scan reports PR_GET_DUMPABLE = 0 as well."""
    from tests.conftest import start_worker

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_DUMPABLE is Linux's")
    upgrade(sqlite_url)
    env = base_env(
        sqlite_url, tmp_path, SCANQUEUE_RUNNER="tests.integration.test_secure:dumpable_runner"
    )
    main = subprocess.run(
        [sys.executable, "-c",
         "import scanqueue.worker.app; from scanqueue.worker.harden import is_dumpable; print(is_dumpable())"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert main.stdout.strip() == "False", main.stderr
    start_worker(procs, env, tmp_path)
    scan_id = run_cli(env, "enqueue", "--provider", "x").stdout.strip()

    def finished() -> bool:
        row = json.loads(run_cli(env, "status", scan_id, "--json").stdout)
        return row["status"] in ("completed", "failed")

    wait_for(finished, 60, what="the scan")
    row = json.loads(run_cli(env, "status", scan_id, "--json").stdout)
    assert row["status"] == "completed", row
    assert row["findings_count"] == 10  # 10 + dumpable flag 0
    # A process that does not load the Celery app stays dumpable (asked in a fresh
    # interpreter: this test process may have loaded the app for another test).
    plain = subprocess.run(
        [sys.executable, "-c",
         "from scanqueue.worker.harden import is_dumpable; print(is_dumpable())"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plain.stdout.strip() == "True", plain.stderr
