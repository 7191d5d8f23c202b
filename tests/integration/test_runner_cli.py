"""The real runner's commands (docs/reference.md#runner-api): providers, checks, findings — and the whole
path with a real worker: register a provider, enqueue, read real findings back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from scanqueue.cli.main import cli
from scanqueue.config import normalize_database_url
from scanqueue.db.store import store_for
from scanqueue.runners.providers.base import Finding
from scanqueue.runners.store import RunnerStore
from tests.claimed import mark_dispatched
from tests.conftest import base_env, run_cli, start_worker, upgrade, wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sarif"
TREE = FIXTURES / "tree"
RUFF = str(Path(sys.executable).parent / "ruff")
RUFF_COMMAND = [RUFF, "check", "--isolated", "--select", "F", "--no-cache"]
RUFF_COMMAND += ["--output-format", "sarif", "--exit-zero", "."]
RUFF_CONFIG = {"command": RUFF_COMMAND, "cwd": str(TREE), "timeout": 60}
TOKEN = "tok-9f2e-do-not-print"


@pytest.fixture
def invoke(store: Any) -> Any:
    """Run `scanqueue ARGS…` in-process against the migrated database."""
    runner = CliRunner()

    def _invoke(*args: str) -> Result:
        return runner.invoke(cli, list(args), env={"DATABASE_URL": store.database_url})

    return _invoke


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_providers_add_list_remove(invoke: Any) -> None:
    added = invoke("providers", "add", "lint", "--kind", "sarif-command", "--config",
                   json.dumps(RUFF_CONFIG))  # fmt: skip
    assert added.exit_code == 0, added.output
    assert added.stdout.strip() == "provider lint added (sarif-command)"

    listed = invoke("providers", "list", "--json")
    assert listed.exit_code == 0
    [provider] = json.loads(listed.stdout)
    assert provider["name"] == "lint"
    assert provider["kind"] == "sarif-command"
    assert provider["config"] == RUFF_CONFIG
    assert provider["enabled"] is True
    assert provider["created_at"].endswith("+00:00")

    table = invoke("providers", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "KIND", "ENABLED", "CONFIG"]
    assert table[1].split()[:3] == ["lint", "sarif-command", "yes"]

    assert invoke("providers", "disable", "lint").exit_code == 0
    assert json.loads(invoke("providers", "list", "--json").stdout)[0]["enabled"] is False
    assert invoke("providers", "enable", "lint").exit_code == 0

    removed = invoke("providers", "remove", "lint")
    assert removed.exit_code == 0
    assert json.loads(invoke("providers", "list", "--json").stdout) == []
    assert invoke("providers", "list").stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "sarif-command", "--config", "{nope"], "--config is not valid JSON"),
        (["--kind", "sarif-command", "--config", "[1]"], "--config must be a JSON object"),
        (
            ["--kind", "no-such-kind", "--config", "{}"],
            "provider 'p': unknown provider kind 'no-such-kind' (available: sarif-command",
        ),
        (
            ["--kind", "sarif-command", "--config", '{"command": "ruff check ."}'],
            "provider 'p' (sarif-command): config.command must be a non-empty array",
        ),
    ],
    ids=["bad-json", "not-object", "unknown-kind", "bad-config"],
)
def test_providers_add_rejects_bad_input(invoke: Any, args: list[str], message: str) -> None:
    line = one_line_error(invoke("providers", "add", "p", *args))
    assert line.startswith("scanqueue: ")
    assert message in line
    assert json.loads(invoke("providers", "list", "--json").stdout) == []


def test_existing_or_unknown_provider_names_exit_1(invoke: Any) -> None:
    config = json.dumps({"command": ["true"]})
    assert (
        invoke("providers", "add", "p", "--kind", "sarif-command", "--config", config).exit_code
        == 0
    )
    line = one_line_error(
        invoke("providers", "add", "p", "--kind", "sarif-command", "--config", config)
    )
    assert line == "scanqueue: provider 'p' already exists"
    assert one_line_error(invoke("providers", "remove", "ghost")) == (
        "scanqueue: no provider named 'ghost'"
    )
    assert invoke("providers", "add", "p").exit_code == 2  # usage: --kind/--config missing


def test_checks_disable_enable_list(invoke: Any) -> None:
    assert invoke("checks", "list", "--json").stdout.strip() == "[]"
    assert invoke("checks", "disable", "F401").stdout.strip() == "check F401 disabled"
    assert invoke("checks", "disable", "B101").exit_code == 0
    assert invoke("checks", "disable", "F401").exit_code == 0  # idempotent
    assert invoke("checks", "enable", "B101").stdout.strip() == "check B101 enabled"

    checks = json.loads(invoke("checks", "list", "--json").stdout)
    assert [(c["check_id"], c["enabled"]) for c in checks] == [("B101", True), ("F401", False)]
    table = invoke("checks", "list").stdout.splitlines()
    assert [row.split()[:2] for row in table] == [
        ["CHECK", "ENABLED"],
        ["B101", "yes"],
        ["F401", "no"],
    ]


def test_findings_of_a_scan(invoke: Any, store: Any) -> None:
    row = store.enqueue(["lint"], [], token=TOKEN)
    mark_dispatched(store, row.id)
    started = store.start_run(row.id, "w")
    RunnerStore(store).add_findings(
        row.id,
        started.attempt,
        "lint",
        [
            Finding(
                "F401", "`os` imported but unused", "high", "a.py", "a.py:1:8", "unused-import"
            ),
            Finding("CIS-1", "bucket is public", "medium", "s3.tf", None, None, "fail", ("cis",)),
        ],
    )

    result = invoke("findings", row.id, "--json")
    assert result.exit_code == 0
    found = json.loads(result.stdout)
    assert [
        {k: f[k] for k in ("check_id", "provider", "severity", "resource", "message")}
        for f in found
    ] == [
        {"check_id": "F401", "provider": "lint", "severity": "high", "resource": "a.py",
         "message": "`os` imported but unused"},
        {"check_id": "CIS-1", "provider": "lint", "severity": "medium", "resource": "s3.tf",
         "message": "bucket is public"},
    ]  # fmt: skip
    assert found[0]["location"] == "a.py:1:8"
    assert found[1]["frameworks"] == ["cis"]
    assert all(f["scan_id"] == row.id for f in found)

    text = invoke("findings", row.id)
    assert text.stdout.splitlines()[0].split() == [
        "STATE",
        "SEVERITY",
        "CHECK",
        "PROVIDER",
        "LOCATION",
        "MESSAGE",
    ]
    assert "a.py:1:8" in text.stdout
    assert TOKEN not in result.stdout + text.stdout

    other = store.enqueue(["lint"], [])
    assert invoke("findings", other.id, "--json").stdout.strip() == "[]"
    assert one_line_error(invoke("findings", "no-such-scan")) == (
        "scanqueue: no scan with id 'no-such-scan'"
    )


# -- end to end: a real worker runs ruff ------------------------------------------------------


@pytest.mark.slow
def test_register_enqueue_and_read_real_findings(
    db_url: str, tmp_path: Path, procs: list[Any]
) -> None:
    upgrade(db_url)
    env = base_env(db_url, tmp_path, SCANQUEUE_RUNNER="scanqueue:ScanRunner")
    worker = start_worker(procs, env, tmp_path)

    added = run_cli(env, "providers", "add", "lint", "--kind", "sarif-command", "--config",
                    json.dumps(RUFF_CONFIG))  # fmt: skip
    assert added.returncode == 0, added.stderr
    RunnerStore(store_for(normalize_database_url(db_url))).set_check("F541", False)

    enqueued = run_cli(env, "enqueue", "--provider", "lint")
    assert enqueued.returncode == 0, enqueued.stderr
    scan_id = enqueued.stdout.strip()
    # A second scan, inserted as another program would, with a token and a missing provider.
    store = store_for(normalize_database_url(db_url))
    failing = store.enqueue(["lint", "ghost"], ["soc2"], token=TOKEN)

    def finished(sid: str) -> Any:
        row = store.get(sid)
        return row if row.status in ("completed", "failed", "canceled") else None

    done = wait_for(lambda: finished(scan_id), 60, interval=0.2, what="the ruff scan")
    assert done.status == "completed", done.error
    assert done.findings_count == 4

    shown = run_cli(env, "findings", scan_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [
        (f["check_id"], f["provider"], f["severity"], f["resource"], f["message"])
        for f in json.loads(shown.stdout)
    ] == [
        ("F401", "lint", "high", "app/models.py", "`os` imported but unused"),
        ("F401", "lint", "high", "app/models.py", "`sys` imported but unused"),
        ("F841", "lint", "high", "app/models.py",
         "Local variable `unused` is assigned to but never used"),
        ("F821", "lint", "high", "app/views.py", "Undefined name `undefined_value`"),
    ]  # fmt: skip

    failed = wait_for(lambda: finished(failing.id), 60, interval=0.2, what="the failing scan")
    assert failed.status == "failed"
    assert failed.error == "unknown provider 'ghost'"
    assert RunnerStore(store).count_findings(failing.id) == 0

    # Canceling a running scan kills its scanner, children included.
    pidfile = tmp_path / "hang.pids"
    hang = [sys.executable, str(FIXTURES / "hang.py"), str(pidfile)]
    RunnerStore(store).add_provider("hang", "sarif-command", {"command": hang, "timeout": 90})
    hanging = store.enqueue(["hang"], [])
    wait_for(pidfile.exists, 30, what="the hanging scanner to start")
    pids = [int(p) for p in pidfile.read_text().split()]
    canceled = run_cli(env, "cancel", hanging.id)
    assert canceled.returncode == 0, canceled.stderr
    wait_for(lambda: not any(alive(p) for p in pids), 15, what="the scanner to be killed")
    assert store.get(hanging.id).status == "canceled"
    assert "killed the command, the scan was stopped" in worker.output()

    assert TOKEN not in worker.output()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
