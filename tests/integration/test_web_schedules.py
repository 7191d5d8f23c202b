"""``/api/v1/schedules`` (docs/reference.md#schedules) on SQLite and PostgreSQL: routes, errors, guards."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from scanqueue.api.app import create_app
from tests.integration.conftest import api_settings

TOKEN = "t0ps3cret-api-token"
NIGHTLY = {
    "name": "nightly",
    "cron": "0 3 * * *",
    "tz": "Europe/Berlin",
    "providers": ["aws"],
    "frameworks": ["soc2"],
    "priority": 2,
}


def test_create_get_list_pause_resume_run_delete(client: TestClient) -> None:
    created = client.post("/api/v1/schedules", json=NIGHTLY)
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    assert created.headers["location"] == "/api/v1/schedules/nightly"
    assert body["next_run_at"].endswith("+00:00") and body["on_missed"] == "once"
    assert (body["key"], body["on_overlap"], body["paused"]) == (None, "skip", False)
    assert client.get("/api/v1/schedules/nightly").json() == body
    assert [s["name"] for s in client.get("/api/v1/schedules").json()["schedules"]] == ["nightly"]
    assert client.post("/api/v1/schedules/nightly/pause").json()["paused"] is True
    assert client.post("/api/v1/schedules/nightly/resume").json()["paused"] is False
    run = client.post("/api/v1/schedules/nightly/run")
    assert run.status_code == 201, run.text
    scan = run.json()
    assert scan["status"] == "queued" and scan["frameworks_scanned"] == ["soc2"]
    assert run.headers["location"] == f"/api/v1/scans/{scan['id']}"
    assert client.get("/api/v1/schedules/nightly").json()["last_scan_id"] == scan["id"]
    assert client.delete("/api/v1/schedules/nightly").status_code == 204
    assert client.get("/api/v1/schedules").json() == {"schedules": []}
    assert client.get(f"/api/v1/scans/{scan['id']}").status_code == 200  # its scans stay


def test_errors_answer_404_409_and_422_naming_the_field(client: TestClient) -> None:
    for method, path in (
        ("GET", "/api/v1/schedules/nope"),
        ("DELETE", "/api/v1/schedules/nope"),
        ("POST", "/api/v1/schedules/nope/pause"),
        ("POST", "/api/v1/schedules/nope/resume"),
        ("POST", "/api/v1/schedules/nope/run"),
    ):
        assert client.request(method, path).status_code == 404, (method, path)
    assert client.post("/api/v1/schedules", json=NIGHTLY).status_code == 201
    dup = client.post("/api/v1/schedules", json=NIGHTLY)
    assert dup.status_code == 409 and "exists" in dup.json()["error"]
    for bad, field in (
        ({**NIGHTLY, "name": "b", "cron": "61 * * * *"}, "cron"),
        ({**NIGHTLY, "name": "b", "tz": "Mars/Olympus"}, "tz"),
        ({**NIGHTLY, "name": "b", "every_seconds": 60}, "cron"),
        ({**NIGHTLY, "name": "b", "providers": []}, "providers"),
        ({**NIGHTLY, "name": "b", "on_missed": "twice"}, "on_missed"),
        ({**NIGHTLY, "name": "b", "triggered_by_token": "x"}, "triggered_by_token"),
        ({"name": "b", "every_seconds": "60", "providers": ["aws"]}, "every_seconds"),
    ):
        answer = client.post("/api/v1/schedules", json=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert field in {d["field"] for d in answer.json()["details"]}, answer.json()
    assert (
        client.post(
            "/api/v1/schedules", content=b"{", headers={"Content-Type": "application/json"}
        ).status_code
        == 400
    )
    assert client.post("/api/v1/schedules", content=b"{}").status_code == 415


def test_the_routes_are_guarded_like_every_api_route(migrated: str) -> None:
    app = create_app(api_settings(migrated, SCANQUEUE_API_TOKEN=TOKEN))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for method, path in (
            ("GET", "/api/v1/schedules"),
            ("POST", "/api/v1/schedules"),
            ("GET", "/api/v1/schedules/x"),
            ("DELETE", "/api/v1/schedules/x"),
            ("POST", "/api/v1/schedules/x/run"),
        ):
            assert client.request(method, path).status_code == 401, (method, path)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/api/v1/schedules", json=NIGHTLY, headers=auth).status_code == 201
    # Without a token, a write from a non-loopback Host is refused.
    with TestClient(create_app(api_settings(migrated)), base_url="http://evil.example") as client:
        assert client.post("/api/v1/schedules/nightly/run").status_code == 403
        assert client.delete("/api/v1/schedules/nightly").status_code == 403


def test_the_openapi_document_lists_the_schedule_routes(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/api/v1/schedules"]) == {"get", "post"}
    assert set(paths["/api/v1/schedules/{name}"]) == {"get", "delete"}
    for verb in ("pause", "resume", "run"):
        assert "post" in paths[f"/api/v1/schedules/{{name}}/{verb}"]
    assert {"Schedule", "ScheduleRequest"} <= set(doc["components"]["schemas"])
