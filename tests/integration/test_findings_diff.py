"""Findings over time (docs/reference.md#findings-over-time): fingerprints, the diff against the baseline, reading it.

End to end with the real runner and real scanners from PyPI (ruff, bandit,
semgrep) over a tree in ``tmp_path`` that changes between runs, on SQLite and
PostgreSQL.  Each finding sits in a file of its own, so that a change to one
never moves another's line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from scanqueue import Job, ScanContext, ScanRunner
from scanqueue.db.schema import findings, scans
from scanqueue.errors import ConflictError
from scanqueue.runners.diff_view import read_diff
from scanqueue.runners.fingerprint import finding_fingerprint
from scanqueue.runners.providers.sarif_command import SarifCommandProvider
from scanqueue.runners.store import LeaseLostError, RunnerStore
from tests.claimed import mark_dispatched
from tests.conftest import base_env, run_cli

BIN = Path(sys.executable).parent
RUFF = [str(BIN / "ruff"), "check", "--isolated", "--select", "F", "--no-cache"]
RUFF += ["--output-format", "sarif", "."]
BANDIT = [str(BIN / "bandit"), "-q", "-f", "sarif", "-r", "."]
SEMGREP = [str(BIN / "semgrep"), "scan", "--metrics=off", "--disable-version-check", "-q"]
SEMGREP += ["--sarif", "--config", "rules.yml", "."]
SEMGREP_RULES = """\
rules:
  - id: no-pickle-loads
    pattern: pickle.loads(...)
    message: pickle.loads is unsafe
    languages: [python]
    severity: ERROR
  - id: no-eval
    pattern: eval(...)
    message: eval is unsafe
    languages: [python]
    severity: WARNING
"""


@pytest.fixture
def rs(store: Any) -> RunnerStore:
    return RunnerStore(store)


@pytest.fixture(autouse=True)
def _database_env(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if "store" in request.fixturenames:
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("store").database_url)


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Make ``root`` hold exactly ``files`` (name → text)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)


def start(store: Any, providers: list[str]) -> Job:
    row = store.enqueue(providers, [], user="ann")
    mark_dispatched(store, row.id)
    started = store.start_run(row.id, "test-worker")
    assert started is not None
    return Job.from_stored(
        started.scan_id, started.providers_raw, started.frameworks_raw, attempt=started.attempt
    )


def scan(store: Any, providers: list[str], final: str = "completed") -> str:
    """One scan, run by the real runner and finished as a worker would."""
    job = start(store, providers)
    result = ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))
    done = store.finish_run(
        job.scan_id, job.attempt, final, findings_count=result.findings_count, error=None
    )
    assert done is not None and done.status == final
    return job.scan_id


def files_in(rs: RunnerStore, scan_id: str, state: str) -> set[str]:
    return {f.resource or "" for f in rs.list_findings(scan_id, state)}


def row(store: Any, scan_id: str) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(select(scans).where(scans.c.id == scan_id)).one()


# -- the diff, end to end --------------------------------------------------------------


def test_ruff_run_three_times_over_a_changing_tree(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    a, b, c, d = "import os\n", "import sys\n", "print(undefined_name)\n", "import json\n"

    write_tree(tree, {"a.py": a, "b.py": b, "c.py": c, "d.py": "\n"})
    first = scan(store, ["lint"])
    assert row(store, first).findings_new == 3 and row(store, first).findings_fixed == 0
    assert row(store, first).baseline_id is None
    assert files_in(rs, first, "new") == {"a.py", "b.py", "c.py"}

    # a.py fixed, d.py gains a problem; b and c stay.
    write_tree(tree, {"a.py": "\n", "b.py": b, "c.py": c, "d.py": d})
    second = scan(store, ["lint"])
    r2 = row(store, second)
    assert (r2.baseline_id, r2.findings_new, r2.findings_fixed, r2.findings_count) == (
        first,
        1,
        1,
        3,
    )
    assert files_in(rs, second, "new") == {"d.py"}
    assert files_in(rs, second, "unchanged") == {"b.py", "c.py"}
    assert files_in(rs, second, "fixed") == {"a.py"}
    assert rs.count_findings(second) == 3  # the fixed row is not a finding of this scan

    # a.py's problem comes back (seen in the first scan): reopened; d.py is fixed.
    write_tree(tree, {"a.py": a, "b.py": b, "c.py": c, "d.py": "\n"})
    third = scan(store, ["lint"])
    view = read_diff(rs, third)
    assert view.baseline_id == second
    assert [f.resource for f in view.reopened] == ["a.py"]
    assert [f.resource for f in view.new] == []
    assert [f.resource for f in view.fixed] == ["d.py"]
    assert view.unchanged == 2
    r3 = row(store, third)
    assert (r3.findings_new, r3.findings_fixed, r3.findings_count) == (1, 1, 3)
    shown = view.to_json()
    assert set(shown) == {"scan_id", "baseline_id", "new", "fixed", "reopened", "unchanged"}
    assert shown["fixed"][0]["check_id"] == "F401" and shown["fixed"][0]["state"] == "fixed"


def test_bandit_same_input_is_unchanged_and_a_change_is_new_and_fixed(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("sec", "sarif-command", {"command": BANDIT, "cwd": str(tree)})
    shell = "import subprocess\n\n\ndef f(x):\n    subprocess.call(x, shell=True)\n"
    pickled = "import pickle\n\n\ndef g(x):\n    return pickle.loads(x)\n"
    assert_ = "def h(x):\n    assert x\n"

    write_tree(tree, {"shell.py": shell, "pick.py": pickled})
    first = scan(store, ["sec"])
    count = row(store, first).findings_count
    assert count >= 3 and row(store, first).findings_new == count

    second = scan(store, ["sec"])  # the same input: bandit's findings are stable
    r2 = row(store, second)
    assert (r2.baseline_id, r2.findings_new, r2.findings_fixed) == (first, 0, 0)
    assert rs.count_findings(second, "unchanged") == count

    write_tree(tree, {"shell.py": shell, "asserts.py": assert_})
    third = scan(store, ["sec"])
    assert files_in(rs, third, "fixed") == {"pick.py"}
    assert files_in(rs, third, "new") == {"asserts.py"}
    assert files_in(rs, third, "unchanged") == {"shell.py"}
    fixed_checks = {f.check_id for f in rs.list_findings(third, "fixed")}
    assert {"B403", "B301"} <= fixed_checks


def test_a_failed_or_canceled_scan_is_never_a_baseline(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n"})
    good = scan(store, ["lint"])
    write_tree(tree, {"a.py": "\n", "b.py": "import sys\n"})
    scan(store, ["lint"], final="failed")
    scan(store, ["lint"], final="canceled")

    latest = scan(store, ["lint"])

    view = read_diff(rs, latest)
    assert view.baseline_id == good
    assert [f.resource for f in view.fixed] == ["a.py"]
    assert [f.resource for f in view.new] == ["b.py"]


def test_only_scans_of_the_same_key_and_finished_before_the_start_count(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    rs.add_provider("lint2", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n"})
    scan(store, ["lint2"])  # another key: never this one's baseline
    running = start(store, ["lint"])
    ScanRunner().run(running, ScanContext(running.scan_id, running.attempt))
    done_meanwhile = scan(store, ["lint"])  # started after, finishes first
    assert row(store, done_meanwhile).baseline_id is None
    store.finish_run(running.scan_id, running.attempt, "completed", findings_count=1)

    # The first run started before done_meanwhile finished: no baseline either.
    assert row(store, running.scan_id).baseline_id is None
    assert rs.count_findings(running.scan_id, "new") == 1


def test_a_zombie_run_writes_no_diff(store: Any, rs: RunnerStore, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n"})
    old = start(store, ["lint"])
    ScanRunner().run(old, ScanContext(old.scan_id, old.attempt))
    with store.engine.begin() as conn:  # the reaper re-queues it; a new run wins it
        conn.execute(update(scans).where(scans.c.id == old.scan_id).values(status="queued"))
    mark_dispatched(store, old.scan_id)
    new = store.start_run(old.scan_id, "worker-2")
    assert new is not None
    with store.engine.begin() as conn:
        conn.execute(
            update(findings).where(findings.c.scan_id == old.scan_id).values(state="unchanged")
        )

    with pytest.raises(LeaseLostError):
        rs.write_diff(old.scan_id, old.attempt)

    assert {f.state for f in rs.list_findings(old.scan_id)} == {"unchanged"}
    with pytest.raises(ConflictError):
        read_diff(rs, old.scan_id)  # the new run's start cleared the counts


def test_a_rerun_recomputes_the_diff_from_scratch(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n"})
    scan(store, ["lint"])
    write_tree(tree, {"b.py": "import sys\n"})
    job = start(store, ["lint"])
    ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))
    ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))  # e.g. a retry
    assert rs.count_findings(job.scan_id, "fixed") == 1
    assert rs.count_findings(job.scan_id, "new") == 1
    assert row(store, job.scan_id).findings_fixed == 1


def test_findings_stored_before_fingerprints_are_matched_by_their_hash(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n"})
    old = scan(store, ["lint"])
    with store.engine.begin() as conn:  # as revision 0007 left them
        conn.execute(
            update(findings).where(findings.c.scan_id == old).values(fingerprint=None, state=None)
        )
    now = scan(store, ["lint"])
    assert (row(store, now).findings_new, row(store, now).findings_fixed) == (0, 0)


def test_the_completed_event_carries_the_counts(
    store: Any, rs: RunnerStore, tmp_path: Path
) -> None:
    from scanqueue.observe.event_sender import EventObserver
    from scanqueue.observe.event_sinks import TableEventSink
    from scanqueue.observe.observer import RunInfo

    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n", "b.py": "import sys\n"})
    job = start(store, ["lint"])
    ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))
    done = store.finish_run(job.scan_id, job.attempt, "completed", findings_count=2)
    assert done is not None and (done.findings_new, done.findings_fixed) == (2, 0)

    sink = TableEventSink(store, 1000)
    observer = EventObserver(sink)
    observer.finished(RunInfo(job.scan_id, job.attempt, ["lint"], []), done, 0.5)
    assert observer.flush(10)
    (completed,) = [e for e in sink.read_after(None, 100) if e.type == "scan.completed"]
    event = json.loads(completed.to_json())
    assert (event["findings_new"], event["findings_fixed"], event["findings_count"]) == (2, 0, 2)


# -- fingerprints of real scanners -------------------------------------------------------


def test_semgrep_login_placeholder_is_not_taken_for_a_fingerprint(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(SEMGREP_RULES)
    (tmp_path / "x.py").write_text("import pickle\n\n\ndef f(x):\n    return pickle.loads(x)\n")
    (tmp_path / "y.py").write_text("def g(x):\n    return eval(x)\n")
    config = {"command": SEMGREP, "cwd": str(tmp_path), "timeout": 120}
    config["env"] = {"SEMGREP_ENABLE_VERSION_CHECK": "0", "SEMGREP_SEND_METRICS": "off"}

    runs = [list(SarifCommandProvider("sg", config).collect(ScanContext("s"))) for _ in range(2)]

    assert [sorted(f.check_id for f in found) for found in runs] == [
        ["no-eval", "no-pickle-loads"]
    ] * 2
    # semgrep run logged out gives every result "requires login": never used.
    assert all(f.fingerprint is None for found in runs for f in found)
    prints = [sorted(finding_fingerprint(f) for f in found) for found in runs]
    assert prints[0] == prints[1] and len(set(prints[0])) == 2


def test_scanner_given_fingerprints_survive_a_moved_line(tmp_path: Path) -> None:
    from scanqueue.runners.providers.sarif import iter_findings

    def report(line: int, fingerprints: dict[str, Any]) -> str:
        result = {
            "ruleId": "js/xss",
            "message": {"text": "XSS"},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": "src/a.js"},
                        "region": {"startLine": line},
                    }
                }
            ],
            **fingerprints,
        }
        run = {"tool": {"driver": {"name": "CodeQL"}}, "results": [result]}
        return json.dumps({"version": "2.1.0", "runs": [run]})

    import io

    def fp(text: str) -> str:
        (finding,) = list(iter_findings(io.StringIO(text)))
        return finding_fingerprint(finding)

    codeql = {"partialFingerprints": {"primaryLocationLineHash": "39fa2ee980eb94b0:1"}}
    assert fp(report(10, codeql)) == fp(report(42, codeql))
    # No fingerprint: check, resource, location, message — a moved line is another finding.
    assert fp(report(10, {})) != fp(report(42, {}))
    assert fp(report(10, {})) == fp(report(10, {}))
    # Several keys: the well-known one wins whatever the order; else the sorted first.
    both = {"partialFingerprints": {"zzz": "1", "primaryLocationLineHash": "39fa2ee980eb94b0:1"}}
    assert fp(report(10, both)) == fp(report(10, codeql))
    other = {"fingerprints": {"b/v1": "bbb", "a/v1": "aaa"}}
    assert fp(report(10, other)) == fp(report(11, {"fingerprints": {"a/v1": "aaa"}}))


# -- the commands --------------------------------------------------------------------------


def test_cli_findings_state_diff_and_status(
    store: Any, rs: RunnerStore, db_url: str, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    write_tree(tree, {"a.py": "import os\n", "b.py": "import sys\n"})
    first = scan(store, ["lint"])
    write_tree(tree, {"b.py": "import sys\n", "c.py": "import json\n"})
    second = scan(store, ["lint"])
    env = base_env(db_url, tmp_path)

    listed = json.loads(run_cli(env, "findings", second, "--json").stdout)
    assert sorted((f["resource"], f["state"]) for f in listed) == [
        ("b.py", "unchanged"),
        ("c.py", "new"),
    ]
    fixed = json.loads(run_cli(env, "findings", second, "--state", "fixed", "--json").stdout)
    assert [(f["resource"], f["state"]) for f in fixed] == [("a.py", "fixed")]
    diff = json.loads(run_cli(env, "diff", second, "--json").stdout)
    assert diff["scan_id"] == second and diff["baseline_id"] == first
    assert [f["resource"] for f in diff["new"]] == ["c.py"]
    assert [f["resource"] for f in diff["fixed"]] == ["a.py"]
    assert diff["reopened"] == [] and diff["unchanged"] == 1

    human = run_cli(env, "diff", second).stdout
    assert f"baseline {first}" in human and "c.py" in human and "a.py" in human
    status = run_cli(env, "status", second).stdout
    assert "1 new, 1 fixed" in status and "duration" in status and "finished" in status
    assert json.loads(run_cli(env, "status", second, "--json").stdout)["findings_new"] == 1

    assert run_cli(env, "findings", second, "--state", "bogus").returncode == 2
    missing = run_cli(env, "diff", "no-such-scan")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    queued = store.enqueue(["lint"], []).id
    pending = run_cli(env, "diff", queued)
    assert pending.returncode == 1 and "no diff" in pending.stderr
