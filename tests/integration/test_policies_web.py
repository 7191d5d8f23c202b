"""Scan policies through the API (TestClient) and the CLI, on SQLite and PostgreSQL:
the same validator and words, dedup answers 200, label filters, newest first,
/api/v1/queue, pause/resume and limits over HTTP and from the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import scanqueue
from tests.conftest import base_env, run_cli


def test_api_enqueue_with_policies_and_dedup(client: TestClient) -> None:
    body = {
        "providers": ["aws"],
        "frameworks": ["soc2"],
        "priority": 5,
        "key": "acct-1",
        "run_after": "2030-01-01T00:00:00",
        "timeout_seconds": 30,
        "labels": {"team": "payments"},
        "unique": True,
    }
    first = client.post("/api/v1/scans", json=body)
    assert first.status_code == 201, first.text
    scan = first.json()
    assert scan["deduplicated"] is False and scan["key"] == "acct-1"
    assert scan["priority"] == 5 and scan["labels"] == {"team": "payments"}
    assert scan["run_after"] == "2030-01-01T00:00:00.000000+00:00"
    again = client.post("/api/v1/scans", json=body)
    assert again.status_code == 200
    assert again.json()["id"] == scan["id"] and again.json()["deduplicated"] is True
    assert "triggered_by_token" not in again.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"providers": ["aws"], "priority": "x"}, "priority"),
        ({"providers": ["aws"], "labels": {"a b": "c"}}, "labels['a b']"),
        ({"providers": ["aws"], "run_after": "soon"}, "run_after"),
        ({"providers": ["aws"], "timeout_seconds": -1}, "timeout_seconds"),
    ],
)
def test_api_refuses_bad_policy_fields_naming_them(
    client: TestClient, body: dict[str, object], field: str
) -> None:
    answer = client.post("/api/v1/scans", json=body)
    assert answer.status_code == 422
    assert [d["field"] for d in answer.json()["details"]] == [field]


def test_api_list_filters_by_label_and_key_newest_first(client: TestClient) -> None:
    ids = []
    for team in ("a", "b", "a"):
        ids.append(
            client.post(
                "/api/v1/scans", json={"providers": ["aws"], "labels": {"team": team}}
            ).json()["id"]
        )
        time.sleep(0.003)
    got = client.get("/api/v1/scans", params=[("label", "team:a")]).json()["scans"]
    assert [s["id"] for s in got] == [ids[2], ids[0]]
    assert client.get("/api/v1/scans", params={"label": "nocolon"}).status_code == 422
    keyed = client.get("/api/v1/scans", params={"key": "aws|"}).json()["scans"]
    assert [s["id"] for s in keyed] == list(reversed(ids))


def test_api_queue_pause_resume_and_limits(client: TestClient) -> None:
    client.post("/api/v1/scans", json={"providers": ["aws"], "key": "k1"})
    assert client.post("/api/v1/queue/pause").json() == {
        "key": None,
        "paused": True,
        "changed": True,
    }
    assert client.post("/api/v1/queue/pause", json={"key": "k1"}).json()["changed"] is True
    assert client.post("/api/v1/queue/pause", json={"key": ""}).status_code == 422
    assert client.put("/api/v1/limits/k1", json={"max_running": 2}).status_code == 200
    assert client.put("/api/v1/limits/k1", json={"max_running": -1}).status_code == 422
    queue = client.get("/api/v1/queue").json()
    assert queue["depth"] == 1 and queue["paused_all"] is True
    assert {"key": "k1", "limit": 2, "paused": True}.items() <= queue["keys"][0].items()
    assert queue["statuses"]["queued"] == 1 and queue["oldest_queued_age_s"] >= 0
    assert client.get("/api/v1/limits").json()["limits"][0]["max_running"] == 2
    assert client.delete("/api/v1/limits/k1").status_code == 200
    assert client.delete("/api/v1/limits/k1").status_code == 404
    assert client.post("/api/v1/queue/resume").json()["changed"] is True
    assert "/api/v1/queue" in client.get("/openapi.json").json()["paths"]


def test_cli_policies(migrated: str, tmp_path: Path) -> None:
    env = base_env(migrated, tmp_path)
    out = run_cli(
        env, "enqueue", "--provider", "aws", "--label", "team=pay", "--priority", "3", "--json"
    )
    assert out.returncode == 0, out.stderr
    scan = json.loads(out.stdout)
    assert scan["labels"] == {"team": "pay"} and "deduplicated" not in scan
    dup = run_cli(env, "enqueue", "--provider", "aws", "--unique", "--json")
    assert json.loads(dup.stdout)["id"] == scan["id"] and json.loads(dup.stdout)["deduplicated"]
    plain = run_cli(env, "enqueue", "--provider", "aws", "--unique")
    assert plain.stdout.strip() == scan["id"]
    bad = run_cli(env, "enqueue", "--provider", "aws", "--run-after", "soon")
    assert bad.returncode == 2 and "run_after: must be an ISO-8601 time" in bad.stderr
    # The API's words, for the same value.
    bad_label = run_cli(env, "enqueue", "--provider", "aws", "--label", "a b=c")
    assert bad_label.returncode == 2 and "--label" in bad_label.stderr
    listed = run_cli(env, "list", "--label", "team=pay", "--json")
    assert [s["id"] for s in json.loads(listed.stdout)] == [scan["id"]]
    assert run_cli(env, "pause").stdout.strip() == "paused the whole queue"
    assert run_cli(env, "pause", "aws|").returncode == 0
    assert run_cli(env, "limits", "set", "aws|", "2").returncode == 0
    limits = json.loads(run_cli(env, "limits", "list", "--json").stdout)
    assert [(x["key"], x["max_running"]) for x in limits] == [("aws|", 2)]
    queue = json.loads(run_cli(env, "queue", "--json").stdout)
    assert queue["paused_all"] and queue["keys"][0]["paused"] and queue["keys"][0]["limit"] == 2
    human = run_cli(env, "queue")
    assert "PAUSED: the whole queue" in human.stdout and "aws|" in human.stdout
    missing = run_cli(env, "limits", "clear", "nope")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert run_cli(env, "resume").returncode == 0
    assert run_cli(env, "limits", "set", "k", "-1").returncode == 2


def test_python_enqueue(migrated: str) -> None:
    first = scanqueue.enqueue(
        migrated, providers=["aws"], key="py-1", labels={"via": "python"}, unique=True
    )
    second = scanqueue.enqueue(migrated, providers=["aws"], key="py-1", unique=True)
    assert not first.deduplicated and second.deduplicated and second.id == first.id
    assert first.scan.labels == {"via": "python"}
    with pytest.raises(scanqueue.InvalidScanRequest, match="priority"):
        scanqueue.enqueue(migrated, providers=["aws"], priority=10**9)


def test_serve_exports_request_metrics_and_the_oldest_queued_age(client: TestClient) -> None:
    client.post("/api/v1/scans", json={"providers": ["aws"]})
    client.get("/api/v1/scans/no-such-id")
    text = client.get("/metrics").text
    assert "scanqueue_oldest_queued_age_seconds" in text
    assert (
        'scanqueue_http_requests_total{method="GET",route="/api/v1/scans/{scan_id}",status="404"}'
        in text
    )
    assert 'scanqueue_http_request_duration_seconds_count{method="POST",route="/api/v1/scans"}' in (
        text
    )
    assert "no-such-id" not in text
