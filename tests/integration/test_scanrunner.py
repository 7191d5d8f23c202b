"""The real runner (docs/reference.md#runner-api, "The real runner"): ScanRunner, sarif-command, the SARIF reader.

Everything that touches the database runs on SQLite and PostgreSQL; scanners are
real processes (ruff over tests/fixtures/sarif/tree, and small scripts that
misbehave on purpose).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from scanqueue import Job, ScanContext, ScanRunner
from scanqueue.db.schema import scans
from scanqueue.runners.providers import (
    ProviderConfigError,
    ProviderError,
    available_kinds,
    load_kind,
)
from scanqueue.runners.providers.base import Finding
from scanqueue.runners.providers.sarif import SarifError, iter_findings
from scanqueue.runners.providers.sarif_command import SarifCommandProvider, scrubbed_environ
from scanqueue.runners.store import LeaseLostError, RunnerStore
from tests.claimed import mark_dispatched
from tests.conftest import REPO

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sarif"
TREE = FIXTURES / "tree"
RUFF = str(Path(sys.executable).parent / "ruff")
PY = sys.executable

RUFF_COMMAND = [RUFF, "check", "--isolated", "--select", "F", "--no-cache"]
RUFF_COMMAND += ["--output-format", "sarif", "."]

# (check_id, severity, resource, location, title, message) of ruff over TREE.
RUFF_FINDINGS = [
    ("F401", "high", "app/models.py", "app/models.py:1:8", "unused-import",
     "`os` imported but unused"),
    ("F401", "high", "app/models.py", "app/models.py:2:8", "unused-import",
     "`sys` imported but unused"),
    ("F841", "high", "app/models.py", "app/models.py:6:5", "unused-variable",
     "Local variable `unused` is assigned to but never used"),
    ("F541", "high", "app/models.py", "app/models.py:11:12", "f-string-missing-placeholders",
     "f-string without any placeholders"),
    ("F821", "high", "app/views.py", "app/views.py:5:20", "undefined-name",
     "Undefined name `undefined_value`"),
]  # fmt: skip

TOKEN = "tok-3b1f-super-secret"


# -- helpers ----------------------------------------------------------------------------


class Events:
    """An event sink that records what the runner reported."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event_type: str, payload: dict[str, Any]) -> None:
        self.items.append((event_type, payload))

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [p for t, p in self.items if t == event_type]


def start_scan(store: Any, providers: list[str], frameworks: list[str] | None = None) -> Job:
    """A scan as a worker sees it: enqueued, then won (queued → running)."""
    row = store.enqueue(providers, frameworks or [], user="alice", token=TOKEN)
    mark_dispatched(store, row.id)
    started = store.start_run(row.id, "test-worker")
    assert started is not None
    return Job.from_stored(
        started.scan_id,
        started.providers_raw,
        started.frameworks_raw,
        triggered_by_user=started.triggered_by_user,
        triggered_by_token=started.triggered_by_token,
        attempt=started.attempt,
    )


def rerun(store: Any, job: Job) -> Job:
    """Put the scan back to queued (as the reaper does) and win it again."""
    with store.engine.begin() as conn:
        conn.execute(update(scans).where(scans.c.id == job.scan_id).values(status="queued"))
    mark_dispatched(store, job.scan_id)
    started = store.start_run(job.scan_id, "test-worker-2")
    assert started is not None
    return Job(job.scan_id, job.providers_scanned, job.frameworks_scanned, attempt=started.attempt)


def ruff_provider(rs: RunnerStore, name: str = "lint", **extra: Any) -> None:
    rs.add_provider(name, "sarif-command", {"command": RUFF_COMMAND, "cwd": str(TREE), **extra})


def emit_provider(rs: RunnerStore, name: str, sarif: Path, exit_code: int = 0) -> None:
    command = [PY, str(FIXTURES / "emit.py"), str(sarif), str(exit_code)]
    rs.add_provider(name, "sarif-command", {"command": command, "timeout": 30})


def stored(rs: RunnerStore, scan_id: str) -> list[tuple[Any, ...]]:
    return [
        (f.check_id, f.severity, f.resource, f.location, f.title, f.message)
        for f in rs.list_findings(scan_id)
    ]


def collect(config: dict[str, Any], ctx: ScanContext | None = None) -> list[Finding]:
    provider = SarifCommandProvider("probe", config)
    return list(provider.collect(ctx or ScanContext("scan-x")))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def read_pids(path: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the hanging script never started"
        time.sleep(0.02)
    return [int(p) for p in path.read_text().split()]


def wait_dead(pids: list[int], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


@pytest.fixture
def rs(store: Any) -> RunnerStore:
    return RunnerStore(store)


@pytest.fixture(autouse=True)
def _database_env(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    # ScanRunner reads DATABASE_URL itself, like in a worker.
    if "store" in request.fixturenames:
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("store").database_url)


# -- the runner, end to end on each database ---------------------------------------------


def test_ruff_findings_are_stored_exactly(store: Any, rs: RunnerStore) -> None:
    ruff_provider(rs)
    job = start_scan(store, ["lint"])
    events = Events()
    ctx = ScanContext(job.scan_id, job.attempt, emit=events)

    # ruff exits 1 here (it found problems): the results still count.
    result = ScanRunner().run(job, ctx)

    assert result.findings_count == 5
    assert stored(rs, job.scan_id) == RUFF_FINDINGS
    assert {f.provider for f in rs.list_findings(job.scan_id)} == {"lint"}
    assert {f.status for f in rs.list_findings(job.scan_id)} == {"fail"}
    reported = events.of("scan.finding")
    assert [(p["check_id"], p["location"]) for p in reported] == [
        (f[0], f[3]) for f in RUFF_FINDINGS
    ]
    assert events.of("scan.progress")[0]["provider"] == "lint"
    assert events.of("scan.progress")[-1]["percent"] == 100
    assert TOKEN not in json.dumps(events.items)


def test_disabled_check_produces_no_findings(store: Any, rs: RunnerStore) -> None:
    ruff_provider(rs)
    rs.set_check("F401", False)
    rs.set_check("F821", False)
    rs.set_check("F821", True)  # enabled again: counts
    job = start_scan(store, ["lint"])

    result = ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))

    assert result.findings_count == 3
    assert stored(rs, job.scan_id) == [f for f in RUFF_FINDINGS if f[0] != "F401"]


def test_rerun_replaces_findings(store: Any, rs: RunnerStore) -> None:
    ruff_provider(rs)
    job = start_scan(store, ["lint"])
    assert ScanRunner().run(job, ScanContext(job.scan_id, job.attempt)).findings_count == 5

    rs.set_check("F841", False)
    job2 = rerun(store, job)
    result = ScanRunner().run(job2, ScanContext(job2.scan_id, job2.attempt))

    assert result.findings_count == 4
    assert stored(rs, job.scan_id) == [f for f in RUFF_FINDINGS if f[0] != "F841"]


def test_findings_of_other_scans_are_untouched(store: Any, rs: RunnerStore) -> None:
    ruff_provider(rs)
    job_a = start_scan(store, ["lint"])
    ScanRunner().run(job_a, ScanContext(job_a.scan_id, job_a.attempt))
    job_b = start_scan(store, ["lint"])
    ScanRunner().run(job_b, ScanContext(job_b.scan_id, job_b.attempt))

    assert rs.count_findings(job_a.scan_id) == 5
    assert rs.count_findings(job_b.scan_id) == 5


@pytest.mark.parametrize(
    ("setup", "names", "message"),
    [
        (lambda rs: None, ["ghost"], "unknown provider 'ghost'"),
        (
            lambda rs: (ruff_provider(rs, "off"), rs.set_provider_enabled("off", False)),
            ["off"],
            "provider 'off' is disabled",
        ),
        (lambda rs: ruff_provider(rs), ["lint", "ghost"], "unknown provider 'ghost'"),
        (lambda rs: None, [], "names no providers"),
    ],
    ids=["unknown", "disabled", "one-of-two-unknown", "none"],
)
def test_unknown_or_disabled_provider_fails_naming_it(
    store: Any, rs: RunnerStore, setup: Any, names: list[str], message: str
) -> None:
    setup(rs)
    job = start_scan(store, names)

    with pytest.raises(ProviderError, match=message):
        ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))
    assert rs.count_findings(job.scan_id) == 0


def test_stored_config_that_is_unusable_fails_naming_the_provider(
    store: Any, rs: RunnerStore
) -> None:
    rs.add_provider("broken", "sarif-command", {"command": "ruff check"})
    rs.add_provider("alien", "no-such-kind", {})
    for name in ("broken", "alien"):
        job = start_scan(store, [name])
        with pytest.raises(ProviderConfigError, match=f"provider '{name}'"):
            ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))


@pytest.mark.parametrize(
    ("frameworks", "expected"),
    [
        ([], ["CIS-1", "PCI-1", "GEN-1", "SOC-2", "GEN-1"]),
        (["soc2"], ["CIS-1", "GEN-1", "SOC-2"]),
        (["SOC2", "hipaa"], ["CIS-1", "GEN-1", "SOC-2", "GEN-1"]),
        (["pci-dss"], ["PCI-1", "GEN-1"]),
    ],
)
def test_frameworks_filter_findings(
    store: Any, rs: RunnerStore, frameworks: list[str], expected: list[str]
) -> None:
    emit_provider(rs, "fake", FIXTURES / "frameworks.sarif")
    job = start_scan(store, ["fake"], frameworks)

    result = ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))

    assert [f.check_id for f in rs.list_findings(job.scan_id)] == expected
    assert result.findings_count == len(expected)


def test_frameworks_and_severities_are_stored(store: Any, rs: RunnerStore) -> None:
    emit_provider(rs, "fake", FIXTURES / "frameworks.sarif", exit_code=3)
    job = start_scan(store, ["fake"])
    ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))

    rows = rs.list_findings(job.scan_id)
    assert [(f.check_id, f.severity, f.frameworks, f.title) for f in rows] == [
        ("CIS-1", "high", ["cis", "soc2"], "public-bucket"),
        ("PCI-1", "medium", ["pci-dss"], "Sensitive data in logs"),
        ("GEN-1", "low", [], "generic"),
        ("SOC-2", "high", ["SOC2"], "audit-log"),
        ("GEN-1", "info", ["hipaa"], "generic"),
    ]
    assert rows[0].location == "infra/s3.tf:3"


def test_invalid_sarif_fails_the_scan_without_partial_findings(store: Any, rs: RunnerStore) -> None:
    ruff_provider(rs)
    emit_provider(rs, "garbage", FIXTURES / "malformed" / "truncated.sarif")
    job = start_scan(store, ["lint", "garbage"])
    events = Events()

    with pytest.raises(ProviderError, match="provider 'garbage': invalid SARIF"):
        ScanRunner().run(job, ScanContext(job.scan_id, job.attempt, emit=events))

    assert rs.count_findings(job.scan_id) == 0
    assert len(events.of("scan.finding")) == 5  # reported by 'lint' before 'garbage' ran


def test_cancel_between_batches(store: Any, rs: RunnerStore) -> None:
    emit_provider(rs, "fake", FIXTURES / "frameworks.sarif")
    emit_provider(rs, "fake2", FIXTURES / "frameworks.sarif")
    job = start_scan(store, ["fake", "fake2"])
    events = Events()

    def sink(event_type: str, payload: dict[str, Any]) -> None:
        events(event_type, payload)
        if event_type == "scan.finding":
            ctx.request_stop("canceled")  # as the lease keeper does on a cancel

    ctx = ScanContext(job.scan_id, job.attempt, emit=sink)
    runner = ScanRunner()
    runner.batch_size = 2

    result = runner.run(job, ctx)

    assert result.findings_count == 2
    assert [f.check_id for f in rs.list_findings(job.scan_id)] == ["CIS-1", "PCI-1"]
    assert len(events.of("scan.finding")) == 2
    assert all(p.get("provider") != "fake2" for p in events.of("scan.progress"))


def test_a_run_that_lost_its_lease_writes_nothing(store: Any, rs: RunnerStore) -> None:
    ruff_provider(rs)
    old = start_scan(store, ["lint"])
    new = rerun(store, old)
    ScanRunner().run(new, ScanContext(new.scan_id, new.attempt))

    with pytest.raises(LeaseLostError):
        ScanRunner().run(old, ScanContext(old.scan_id, old.attempt))
    with pytest.raises(LeaseLostError):
        rs.add_findings(old.scan_id, old.attempt, "lint", [Finding("ZOMBIE")])

    assert stored(rs, new.scan_id) == RUFF_FINDINGS


def test_batches_are_written_as_they_come(store: Any, rs: RunnerStore) -> None:
    command = [PY, str(FIXTURES / "many.py"), "450"]
    rs.add_provider("many", "sarif-command", {"command": command})
    job = start_scan(store, ["many"])
    runner = ScanRunner()
    runner.batch_size = 100

    result = runner.run(job, ScanContext(job.scan_id, job.attempt))

    rows = rs.list_findings(job.scan_id)
    assert result.findings_count == len(rows) == 450
    assert [f.message for f in rows[:2]] == ["finding 0", "finding 1"]
    assert rows[-1].location == "src/file49.py:450"


# -- sarif-command: the process ------------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(p.name for p in (FIXTURES / "malformed").iterdir()))
def test_malformed_sarif_is_an_error_naming_the_provider(sample: str) -> None:
    config = {"command": [PY, str(FIXTURES / "emit.py"), str(FIXTURES / "malformed" / sample)]}
    with pytest.raises(ProviderError, match=r"provider 'probe': invalid SARIF output \(command"):
        collect(config)


def test_nonzero_exit_without_output_is_an_error() -> None:
    code = "import sys; sys.stderr.write('scanner: bad flag\\n'); sys.exit(3)"
    with pytest.raises(ProviderError) as err:
        collect({"command": [PY, "-c", code]})
    assert str(err.value) == (
        "provider 'probe': command exited with code 3 and printed no SARIF; "
        "stderr: scanner: bad flag"
    )


def test_command_not_found_is_an_error_naming_the_provider(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="provider 'probe': cannot run 'no-such-scanner-x'"):
        collect({"command": ["no-such-scanner-x", "--sarif"]})
    with pytest.raises(ProviderError, match="provider 'probe': working directory"):
        collect({"command": [RUFF], "cwd": str(tmp_path / "missing")})


def test_crash_by_signal_is_an_error() -> None:
    code = "import os, signal; print('{}'); os.kill(os.getpid(), signal.SIGSEGV)"
    with pytest.raises(ProviderError, match="provider 'probe': command was killed by SIGSEGV"):
        collect({"command": [PY, "-c", code]})


def test_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    config = {"command": [PY, str(FIXTURES / "hang.py"), str(pidfile)], "timeout": 3}
    started = time.monotonic()

    with pytest.raises(ProviderError, match=r"provider 'probe': command timed out after 3s"):
        collect(config)

    assert time.monotonic() - started < 8
    pids = read_pids(pidfile)
    assert len(pids) == 2
    wait_dead(pids)


def test_cancel_kills_a_running_command_promptly(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    config = {"command": [PY, str(FIXTURES / "hang.py"), str(pidfile)], "timeout": 60}
    ctx = ScanContext("scan-x")

    def cancel_soon() -> None:
        read_pids(pidfile)
        ctx.request_stop("canceled")

    threading.Thread(target=cancel_soon, daemon=True).start()
    started = time.monotonic()
    assert collect(config, ctx) == []
    assert time.monotonic() - started < 10
    wait_dead(read_pids(pidfile))


def test_the_command_dies_with_a_sigkilled_pool_process(tmp_path: Path) -> None:
    # A stand-in for a pool process, running the provider in its main thread, with a
    # second thread as pool processes have (lease keeper, event sender).
    pidfile = tmp_path / "pids"
    code = (
        "import sys, threading, time\n"
        "from scanqueue.runners.providers.sarif_command import SarifCommandProvider\n"
        "from scanqueue.runners.api import ScanContext\n"
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
        "config = {'command': [sys.executable, sys.argv[1], sys.argv[2]], 'timeout': 600}\n"
        "list(SarifCommandProvider('probe', config).collect(ScanContext('scan-x')))\n"
    )
    pool = subprocess.Popen(
        [PY, "-c", code, str(FIXTURES / "hang.py"), str(pidfile)],
        cwd=REPO,
        start_new_session=True,
    )
    pids: list[int] = []
    try:
        pids = read_pids(pidfile)
        assert alive(pids[0])
        pool.send_signal(signal.SIGKILL)
        pool.wait(10)
        wait_dead(pids[:1])
    finally:
        pool.kill()
        pool.wait(10)
        # The command's own background child is not covered by the signal (and the
        # command itself, if this failed): end them here, as this test started them.
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_background_children_do_not_outlive_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " stdout=subprocess.DEVNULL)\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "print(open(sys.argv[1]).read())\n"
    )
    found = collect({"command": [PY, "-c", code, str(FIXTURES / "frameworks.sarif")]})
    assert len(found) == 5
    wait_dead(read_pids(pidfile))


def test_huge_output_is_capped_and_the_command_killed() -> None:
    config = {"command": [PY, str(FIXTURES / "huge.py")], "max_output_bytes": 1 << 20}
    started = time.monotonic()
    with pytest.raises(
        ProviderError, match=r"provider 'probe': command printed more than 1048576 bytes"
    ):
        collect(config)
    assert time.monotonic() - started < 10


def test_large_output_is_streamed_not_held_in_memory() -> None:
    # ~8 MB of SARIF (3000 results padded with whitespace) goes through with a small heap.
    command = [PY, str(FIXTURES / "many.py"), "3000", "2500"]
    provider = SarifCommandProvider("probe", {"command": command})
    tracemalloc.start()
    try:
        count = sum(1 for _ in provider.collect(ScanContext("scan-x")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 3000
    assert peak < 2_000_000, f"peak {peak} bytes"


def test_environment_has_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DATABASE_URL": "postgresql://u:pw@db/x",
        "REDIS_URL": "redis://r",
        "CELERY_BROKER_URL": "redis://r",
        "SCANQUEUE_API_TOKEN": "t",
        "GITHUB_TOKEN": "t",
        "MY_DB_PASSWORD": "p",
        "AWS_SECRET_ACCESS_KEY": "s",
        "SOME_DSN": "https://user:hunter2@example.com/",
        "HARMLESS_SETTING": "1",
    }.items():
        monkeypatch.setenv(name, value)

    names = [f.message for f in collect({"command": [PY, str(FIXTURES / "envdump.py")],
                                         "env": {"SCANNER_MODE": "strict"}})]  # fmt: skip

    # A minimal environment (PATH, HOME, locale …), not the worker's: nothing else leaks.
    assert "HARMLESS_SETTING" not in names
    assert "SCANNER_MODE" in names
    assert "PATH" in names
    for secret in (
        "DATABASE_URL",
        "REDIS_URL",
        "CELERY_BROKER_URL",
        "SCANQUEUE_API_TOKEN",
        "GITHUB_TOKEN",
        "MY_DB_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "SOME_DSN",
    ):
        assert secret not in names
    assert "HOME" in scrubbed_environ({"HOME": "/root", "X_TOKEN": "t"})


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "config.command must be a non-empty array of strings"),
        ({"command": "ruff check ."}, "config.command must be a non-empty array"),
        ({"command": []}, "config.command must be a non-empty array"),
        ({"command": ["ruff"], "timeout": 0}, "config.timeout must be a positive number"),
        ({"command": ["ruff"], "timeout": "5"}, "config.timeout must be a positive number"),
        ({"command": ["ruff"], "cwd": 3}, "config.cwd must be a non-empty string"),
        ({"command": ["ruff"], "env": {"A": 1}}, "config.env must be an object whose values"),
        ({"command": ["ruff"], "max_output_bytes": -1}, "config.max_output_bytes"),
        ({"command": ["ruff"], "shell": True}, "unknown config key(s) shell"),
    ],
)
def test_bad_config_is_rejected(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ProviderConfigError) as err:
        SarifCommandProvider("probe", config)
    assert str(err.value).startswith("provider 'probe' (sarif-command): ")
    assert problem in str(err.value)


def test_provider_kinds_come_from_entry_points() -> None:
    assert "sarif-command" in available_kinds()
    assert load_kind("sarif-command") is SarifCommandProvider
    with pytest.raises(ProviderConfigError, match="unknown provider kind 'nope'"):
        load_kind("nope")


# -- the SARIF reader ----------------------------------------------------------------------


def test_sarif_mapping_details() -> None:
    with open(FIXTURES / "mapping.sarif", encoding="utf-8") as fh:
        found = list(iter_findings(fh, base_dir="/src"))

    assert found == [
        Finding("R0", "found secret in a.py", "low", "a.py", "a.py", "by-index", "fail"),
        Finding(
            "R1/sub",
            "**ok**",
            "info",
            "arn:aws:s3:::bucket",
            "arn:aws:s3:::bucket",
            "from-properties",
            "pass",
        ),
        Finding("R1", "suppressed one", "medium", None, None, "from-properties", "suppressed"),
        Finding(
            "R2",
            "escaped path",
            "medium",
            "/elsewhere/my file.py",
            "/elsewhere/my file.py:2:5",
            None,
        ),
        Finding("R3", None, "medium"),  # no message, and no rule to describe it
        Finding("T1", "third run", "high"),  # a run without a tool
    ]


def test_sarif_reader_handles_tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every value straddles a chunk boundary at some point.
    monkeypatch.setattr("scanqueue.runners.providers.sarif.READ_CHUNK_CHARS", 7)
    with open(FIXTURES / "frameworks.sarif", encoding="utf-8") as fh:
        found = list(iter_findings(fh))
    assert [f.check_id for f in found] == ["CIS-1", "PCI-1", "GEN-1", "SOC-2", "GEN-1"]
    with (
        open(FIXTURES / "malformed" / "truncated.sarif", encoding="utf-8") as fh,
        pytest.raises(SarifError),
    ):
        list(iter_findings(fh))


def test_sarif_reader_rejects_before_yielding_anything() -> None:
    # A valid first run does not leak out when a later run is broken.
    doc = (FIXTURES / "frameworks.sarif").read_text().rstrip()
    broken = doc[: doc.rindex("]")] + ', {"results": [{"ruleId": "X"}]}]}'
    findings = iter_findings(io.StringIO(broken))
    with pytest.raises(SarifError):
        next(findings)


def test_scanrunner_is_exported_lazily() -> None:
    import scanqueue

    assert scanqueue.ScanRunner is ScanRunner


def test_sarif_reader_stops_when_told() -> None:
    doc = subprocess.run(
        [PY, str(FIXTURES / "many.py"), "2000"], capture_output=True, text=True, check=True
    ).stdout
    assert len(list(iter_findings(io.StringIO(doc)))) == 2000
    assert list(iter_findings(io.StringIO(doc), stop=lambda: True)) == []
    calls: list[int] = []

    def stop_on_third_look() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert list(iter_findings(io.StringIO(doc), stop=stop_on_third_look)) == []
    assert len(calls) == 3
