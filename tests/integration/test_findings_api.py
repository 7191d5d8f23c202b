"""Findings over time over HTTP (docs/reference.md#findings-over-time): findings (paged, filtered), diff, providers, checks.

The scans are run by the real runner (ruff over a tree in ``tmp_path`` that
changes between runs), then read through the app with Starlette's TestClient,
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from scanqueue import Job, ScanContext, ScanRunner
from scanqueue.api.app import create_app
from scanqueue.config import Settings
from scanqueue.runners.store import RunnerStore
from tests.claimed import mark_dispatched

BIN = Path(sys.executable).parent
RUFF = [str(BIN / "ruff"), "check", "--isolated", "--select", "F", "--no-cache"]
RUFF += ["--output-format", "sarif", "."]
TOKEN = "api-t0ken-for-findings"
SECRET = "s3cr3t-scanner-key"


@pytest.fixture
def rs(store: Any, monkeypatch: pytest.MonkeyPatch) -> RunnerStore:
    monkeypatch.setenv("DATABASE_URL", store.database_url)
    return RunnerStore(store)


def _client(store: Any, **env: str) -> TestClient:
    settings = Settings.from_env(
        {"DATABASE_URL": store.database_url, "SCANQUEUE_QUEUE": f"q{time.monotonic_ns()}", **env}
    )
    return TestClient(create_app(settings), base_url="http://127.0.0.1")


@pytest.fixture
def client(store: Any) -> Iterator[TestClient]:
    with _client(store) as c:
        yield c


def scan(store: Any) -> str:
    row = store.enqueue(["lint"], [])
    mark_dispatched(store, row.id)
    started = store.start_run(row.id, "test-worker")
    assert started is not None
    job = Job.from_stored(row.id, started.providers_raw, [], attempt=started.attempt)
    result = ScanRunner().run(job, ScanContext(job.scan_id, job.attempt))
    assert store.finish_run(row.id, job.attempt, "completed", findings_count=result.findings_count)
    return str(row.id)


def two_scans(store: Any, rs: RunnerStore, tree: Path) -> tuple[str, str]:
    rs.add_provider("lint", "sarif-command", {"command": RUFF, "cwd": str(tree)})
    tree.mkdir()
    for i in range(5):
        (tree / f"m{i}.py").write_text("import os\n")
    first = scan(store)
    (tree / "m0.py").write_text("\n")  # fixed
    (tree / "n.py").write_text("import sys\n")  # new
    return first, scan(store)


def test_findings_are_paged_and_filtered_by_state(
    store: Any, rs: RunnerStore, client: TestClient, tmp_path: Path
) -> None:
    _, second = two_scans(store, rs, tmp_path / "tree")

    page = client.get(f"/api/v1/scans/{second}/findings", params={"limit": 2}).json()
    assert page["total"] == 5 and len(page["findings"]) == 2 and page["next_offset"] == 2
    seen = [f["id"] for f in page["findings"]]
    while page["next_offset"] is not None:
        page = client.get(
            f"/api/v1/scans/{second}/findings", params={"limit": 2, "offset": page["next_offset"]}
        ).json()
        seen += [f["id"] for f in page["findings"]]
    assert len(seen) == len(set(seen)) == 5 and seen == sorted(seen)

    def resources(state: str) -> list[str]:
        answer = client.get(f"/api/v1/scans/{second}/findings", params={"state": state})
        assert answer.status_code == 200
        return sorted(f["resource"] for f in answer.json()["findings"])

    assert resources("new") == ["n.py"]
    assert resources("fixed") == ["m0.py"]
    assert resources("unchanged") == ["m1.py", "m2.py", "m3.py", "m4.py"]
    assert resources("reopened") == []

    bad = client.get(f"/api/v1/scans/{second}/findings", params={"state": "open"})
    assert bad.status_code == 422 and "state" in bad.json()["error"]
    bad = client.get(f"/api/v1/scans/{second}/findings", params={"limit": "0"})
    assert bad.status_code == 422 and "limit" in bad.json()["error"]
    assert client.get("/api/v1/scans/nope/findings").status_code == 404


def test_diff_over_http_matches_the_cli_shape(
    store: Any, rs: RunnerStore, client: TestClient, tmp_path: Path
) -> None:
    first, second = two_scans(store, rs, tmp_path / "tree")

    diff = client.get(f"/api/v1/scans/{second}/diff").json()
    assert set(diff) == {"scan_id", "baseline_id", "new", "fixed", "reopened", "unchanged"}
    assert (diff["scan_id"], diff["baseline_id"], diff["unchanged"]) == (second, first, 4)
    assert [f["resource"] for f in diff["new"]] == ["n.py"]
    assert [f["resource"] for f in diff["fixed"]] == ["m0.py"]
    assert client.get(f"/api/v1/scans/{first}/diff").json()["baseline_id"] is None

    queued = store.enqueue(["lint"], []).id
    assert client.get(f"/api/v1/scans/{queued}/diff").status_code == 409
    assert client.get("/api/v1/scans/nope/diff").status_code == 404
    scan_json = client.get(f"/api/v1/scans/{second}").json()
    assert (scan_json["findings_new"], scan_json["findings_fixed"]) == (1, 1)


def test_providers_and_checks_never_show_secrets(store: Any, rs: RunnerStore) -> None:
    rs.add_provider(
        "cloud",
        "sarif-command",
        {
            "command": ["scan", "--api-key", "x"],
            "env": {"CLOUD_KEY": SECRET, "REGION": "eu-west-1", "REF": {"from_env": "MY_KEY"}},
            "api_token": SECRET,
            "timeout": 30,
        },
    )
    rs.set_check("F401", False)
    with _client(store, SCANQUEUE_API_TOKEN=TOKEN) as client:
        assert client.get("/api/v1/providers").status_code == 401
        assert client.get("/api/v1/checks").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = client.get("/api/v1/providers", headers=auth)
        checks = client.get("/api/v1/checks", headers=auth).json()

    assert answer.status_code == 200 and SECRET not in answer.text
    (provider,) = answer.json()["providers"]
    assert (provider["name"], provider["kind"], provider["enabled"]) == (
        "cloud",
        "sarif-command",
        True,
    )
    config = provider["config"]
    assert config["env"] == {"CLOUD_KEY": "***", "REGION": "***", "REF": {"from_env": "MY_KEY"}}
    assert config["api_token"] == "***" and config["timeout"] == 30
    assert checks == {
        "checks": [
            {"check_id": "F401", "enabled": False, "updated_at": checks["checks"][0]["updated_at"]}
        ]
    }


def test_the_openapi_document_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v1/scans/{scan_id}/findings",
        "/api/v1/scans/{scan_id}/diff",
        "/api/v1/providers",
        "/api/v1/checks",
    ):
        assert "get" in paths[path], path
    assert json.dumps(paths)  # serializable as it is served
