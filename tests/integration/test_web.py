"""`scanqueue serve`: the API with TestClient, the SSE stream on a real uvicorn server,
and end to end with a real worker, Redis and PostgreSQL."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from scanqueue.api.app import create_app
from scanqueue.config import Settings, normalize_database_url
from scanqueue.db.store import store_for
from scanqueue.observe.event_sinks import event_sink_for
from scanqueue.observe.events import EventSink
from tests.conftest import (
    BIN,
    Proc,
    base_env,
    free_port,
    run_cli,
    start_worker,
    upgrade,
    wait_for,
)
from tests.integration.conftest import api_settings

TOKEN = "t0ps3cret-api-token"


# -- request / response ------------------------------------------------------------------------


def test_create_get_list_and_cancel(client: TestClient) -> None:
    created = client.post(
        "/api/v1/scans", json={"providers": ["aws", "gcp"], "frameworks": ["soc2"], "user": "ann"}
    )
    assert created.status_code == 201, created.text
    scan = created.json()
    assert created.headers["location"] == f"/api/v1/scans/{scan['id']}"
    assert scan["status"] == "queued" and scan["attempts"] == 0
    assert scan["providers_scanned"] == ["aws", "gcp"]
    assert scan["frameworks_scanned"] == ["soc2"]
    assert scan["triggered_by_user"] == "ann"
    assert scan["created_at"].endswith("+00:00")
    assert "triggered_by_token" not in scan

    got = client.get(f"/api/v1/scans/{scan['id']}")
    assert got.status_code == 200 and got.json() == scan

    canceled = client.post(f"/api/v1/scans/{scan['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    again = client.post(f"/api/v1/scans/{scan['id']}/cancel")
    assert again.status_code == 409
    assert "already canceled" in again.json()["error"]


def test_unknown_ids_and_routes_answer_404(client: TestClient) -> None:
    for method, path in (
        ("GET", "/api/v1/scans/nope"),
        ("POST", "/api/v1/scans/nope/cancel"),
        ("GET", "/api/v1/nothing-here"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert "error" in response.json()


def test_list_is_paginated_newest_first_and_filtered(client: TestClient) -> None:
    ids = [
        client.post("/api/v1/scans", json={"providers": [f"p{i}"]}).json()["id"] for i in range(5)
    ]
    client.post(f"/api/v1/scans/{ids[0]}/cancel")
    page = client.get("/api/v1/scans", params={"limit": 2}).json()
    assert [s["id"] for s in page["scans"]] == [ids[4], ids[3]]
    assert page["next_offset"] == 2
    page = client.get("/api/v1/scans", params={"limit": 2, "offset": 4}).json()
    assert [s["id"] for s in page["scans"]] == [ids[0]] and page["next_offset"] is None
    queued = client.get("/api/v1/scans", params={"status": "queued"}).json()["scans"]
    assert {s["id"] for s in queued} == set(ids[1:])
    canceled = client.get("/api/v1/scans?status=canceled").json()["scans"]
    assert [s["id"] for s in canceled] == [ids[0]]
    for bad in ("status=done", "limit=0", "limit=x", "offset=-1", "limit=100000"):
        response = client.get(f"/api/v1/scans?{bad}")
        assert response.status_code == 422, bad
        assert response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "expected a JSON body"),
        (b"[1, 2]", 422, "JSON object"),
        (b"{}", 422, "providers"),
        (b'{"providers": []}', 422, "at least one"),
        (b'{"providers": "aws"}', 422, "list of strings"),
        (b'{"providers": ["aws", 3]}', 422, "providers[1]"),
        (b'{"providers": ["  "]}', 422, "providers[0]"),
        (b'{"providers": ["aws"], "frameworks": [""]}', 422, "frameworks[0]"),
        (b'{"providers": ["aws"], "user": 7}', 422, "user"),
        (b'{"providers": ["aws"], "triggered_by_token": "x"}', 422, "triggered_by_token"),
    ],
)
def test_bad_bodies_get_clear_4xx(
    client: TestClient, body: bytes, status: int, needle: str
) -> None:
    response = client.post(
        "/api/v1/scans", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert needle in json.dumps(response.json())


def test_oversized_body_is_refused(client: TestClient) -> None:
    body = json.dumps({"providers": ["a" * 100] * 11_000})  # > 1 MiB
    headers = {"Content-Type": "application/json"}
    assert client.post("/api/v1/scans", content=body, headers=headers).status_code == 413


def test_the_token_column_never_leaves(client: TestClient, migrated: str) -> None:
    row = store_for(migrated).enqueue(["aws"], [], user="u", token="very-secret-token")
    for response in (
        client.get(f"/api/v1/scans/{row.id}"),
        client.get("/api/v1/scans"),
        client.post(f"/api/v1/scans/{row.id}/cancel"),
    ):
        assert "very-secret-token" not in response.text
        assert "triggered_by_token" not in response.text


def test_bearer_token_guards_every_api_route(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    app = create_app(api_settings(sqlite_url, SCANQUEUE_API_TOKEN=TOKEN))
    with TestClient(app) as c:
        for method, path in (
            ("POST", "/api/v1/scans"),
            ("GET", "/api/v1/scans"),
            ("GET", "/api/v1/scans/x"),
            ("POST", "/api/v1/scans/x/cancel"),
            ("GET", "/api/v1/events"),
        ):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
            ):
                response = c.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
        good = {"Authorization": f"Bearer {TOKEN}"}
        created = c.post("/api/v1/scans", json={"providers": ["aws"]}, headers=good)
        assert created.status_code == 201
        assert c.get(f"/api/v1/scans/{created.json()['id']}", headers=good).status_code == 200
        # Outside /api/ nothing asks for the token.
        for path in ("/healthz", "/metrics", "/openapi.json", "/"):
            assert c.get(path).status_code == 200, path


def test_healthz_checks_database_and_redis(migrated: str, redis_url: str) -> None:
    with TestClient(create_app(api_settings(migrated, REDIS_URL=redis_url))) as c:
        response = c.get("/healthz")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "ok",
            "checks": {"database": "ok", "redis": "ok"},
            "event_subscribers": 0,
        }
    dead_redis = f"redis://:pw-in-url@127.0.0.1:{free_port()}/0"
    with TestClient(create_app(api_settings(migrated, REDIS_URL=dead_redis))) as c:
        response = c.get("/healthz")
        assert response.status_code == 503
        assert response.json()["checks"]["database"] == "ok"
        assert "pw-in-url" not in response.text


def test_healthz_without_a_database(tmp_path: Path) -> None:
    dead = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x"
    with TestClient(create_app(api_settings(dead))) as c:
        response = c.get("/healthz")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert "hunter2" not in response.text
        assert c.get("/api/v1/scans").status_code == 503


def test_metrics_openapi_and_page(client: TestClient) -> None:
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# HELP" in metrics.text
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {
        "/healthz",
        "/metrics",
        "/api/v1/scans",
        "/api/v1/scans/{scan_id}",
        "/api/v1/scans/{scan_id}/cancel",
        "/api/v1/events",
    } <= set(doc["paths"])
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "EventSource" in page.text and "/api/v1/events" in page.text


# -- a real server -----------------------------------------------------------------------------


class LiveServer:
    """The app on a real uvicorn server, in a thread, on a free loopback port."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.app = create_app(settings, **app_kwargs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, what="uvicorn")
        return self

    def __exit__(self, *exc: object) -> None:
        self.app.state.scanqueue.close_threadsafe()
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


@dataclass
class SSEClient:
    """Reads /api/v1/events in a thread and keeps what it parsed."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    status: int | None = None
    subscribed: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=30)) as http,
                http.stream(
                    "GET",
                    f"{self.url}/api/v1/events",
                    headers=self.headers,
                    params=self.params,
                ) as response,
            ):
                self.status = response.status_code
                if response.status_code != 200:
                    self.subscribed.set()
                    return
                event_id, data = None, []
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(":"):
                        self.comments.append(line)
                        if "subscribed" in line:
                            self.subscribed.set()
                    elif line.startswith("id:"):
                        event_id = line[3:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line == "" and data:
                        self.events.append(json.loads("\n".join(data)))
                        self.ids.append(event_id or "")
                        self.received_at.append(time.monotonic())
                        event_id, data = None, []
        except BaseException as exc:  # surfaced by the test
            self.error = exc
            self.subscribed.set()

    def wait(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        wait_for(
            lambda: len(self.events) >= count or self.error is not None,
            timeout,
            what=f"{count} events (have {len(self.events)})",
        )
        assert self.error is None, self.error
        return self.events[:count]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def _subscribe(server: LiveServer, **kwargs: Any) -> SSEClient:
    client = SSEClient(server.url, **kwargs)
    assert client.subscribed.wait(15), "no subscription comment"
    assert client.error is None, client.error
    return client


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LiveServer, EventSink]]:
    """A live server on each event sink (table on SQLite/PostgreSQL, Redis stream)."""
    env: dict[str, str] = {}
    if request.param == "postgresql":
        db = request.getfixturevalue("pg_url")
    else:
        db = f"sqlite:///{tmp_path / 'scans.db'}"
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    upgrade(db)
    settings = api_settings(normalize_database_url(db), **env)
    with LiveServer(settings, heartbeat_s=0.5, hub_window=8) as server:
        yield server, event_sink_for(settings)


def test_many_clients_get_the_same_events_in_order(live: tuple[LiveServer, EventSink]) -> None:
    server, sink = live
    sink.emit("scan.progress", "before", {"n": -1})  # before anyone subscribed: not sent
    clients = [_subscribe(server) for _ in range(20)]
    emitted: list[str] = []
    emitted_at: dict[str, float] = {}
    for n in range(30):
        event_id = sink.emit("scan.progress", f"s{n % 3}", {"n": n})
        emitted.append(event_id)
        emitted_at[event_id] = time.monotonic()
        if n % 10 == 9:
            time.sleep(0.05)
    latencies: list[float] = []
    for c in clients:
        got = c.wait(30)
        assert [e["n"] for e in got] == list(range(30))
        assert c.ids[:30] == emitted
        assert [e["id"] for e in got] == emitted
        latencies += [c.received_at[i] - emitted_at[emitted[i]] for i in range(30)]
    time.sleep(0.3)
    assert all(len(c.events) == 30 for c in clients)  # nothing twice, nothing extra
    assert server.app.state.scanqueue.subscribers == 20
    for c in clients:
        c.stop.set()
    for c in clients:
        c.close()
    # A client that goes away ends its stream on the server too.
    wait_for(lambda: server.app.state.scanqueue.subscribers == 0, 5, what="streams closed")
    print(
        f"\n20 SSE clients x 30 events: median latency {statistics.median(latencies) * 1000:.0f} ms,"
        f" max {max(latencies) * 1000:.0f} ms"
    )


def test_reconnect_with_last_event_id_resumes_exactly(live: tuple[LiveServer, EventSink]) -> None:
    server, sink = live
    first = _subscribe(server)
    ids = [sink.emit("scan.progress", "s", {"n": n}) for n in range(20)]
    got = first.wait(20)
    assert first.ids[:20] == [e["id"] for e in got] == ids
    first.close()

    # Resume from the 4th: every event after it (some older than the hub's window of 8,
    # read back from the sink), none before, not the 4th itself; then live ones.
    again = _subscribe(server, headers={"Last-Event-ID": ids[3]})
    assert [e["n"] for e in again.wait(16)] == list(range(4, 20))
    later = sink.emit("scan.progress", "s", {"n": 20})
    assert again.wait(17)[-1]["id"] == later
    again.close()

    by_query = _subscribe(server, params={"last_event_id": ids[17]})
    assert [e["n"] for e in by_query.wait(3)] == [18, 19, 20]
    by_query.close()

    latest = _subscribe(server, headers={"Last-Event-ID": later})
    time.sleep(0.5)
    assert latest.events == []
    latest.close()

    # An id from another stream (newer than anything here) means "from now", not "never".
    future = "99999999999999-0" if "-" in later else "99999999"
    stranger = _subscribe(server, headers={"Last-Event-ID": future})
    newest = sink.emit("scan.progress", "s", {"n": 21})
    assert stranger.wait(1)[0]["id"] == newest
    stranger.close()


def test_filter_heartbeat_and_bad_ids(live: tuple[LiveServer, EventSink]) -> None:
    server, sink = live
    only_b = _subscribe(server, params={"scan_id": "b"})
    for n in range(6):
        sink.emit("scan.progress", "a" if n % 2 else "b", {"n": n})
    assert [e["n"] for e in only_b.wait(3)] == [0, 2, 4]
    assert all(e["scan_id"] == "b" for e in only_b.events)
    wait_for(lambda: any("keepalive" in c for c in only_b.comments), 5, what="a heartbeat")
    only_b.close()

    bad = SSEClient(server.url, headers={"Last-Event-ID": "garbage!"})
    bad.thread.join(10)
    assert bad.status == 400


def test_sse_requires_the_token(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    settings = api_settings(sqlite_url, SCANQUEUE_API_TOKEN=TOKEN)
    with LiveServer(settings, heartbeat_s=0.5) as server:
        denied = SSEClient(server.url)
        denied.thread.join(10)
        assert denied.status == 401
        allowed = _subscribe(server, headers={"Authorization": f"Bearer {TOKEN}"})
        event_id = event_sink_for(settings).emit("scan.progress", "s", {"n": 1})
        assert allowed.wait(1)[0]["id"] == event_id
        allowed.close()


# -- end to end: worker, Redis, PostgreSQL, `scanqueue serve` ------------------------------------


def _start_serve(env: dict[str, str], tmp_path: Path, procs: list[Proc]) -> str:
    port = free_port()
    proc = Proc([str(BIN / "scanqueue"), "serve", "--port", str(port)], env, tmp_path, "serve")
    procs.append(proc)
    proc.wait_for_output("Uvicorn running", timeout=30)
    return f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["postgresql+redis", "sqlite"])
def test_worker_events_reach_a_subscriber_in_order(
    deployment: str, request: pytest.FixtureRequest, tmp_path: Path, procs: list[Proc]
) -> None:
    """PostgreSQL with Redis (broker and event stream), and the embedded default
    (SQLite database, SQLite broker, events in the table)."""
    extra: dict[str, str] = {}
    if deployment == "sqlite":
        db = f"sqlite:///{tmp_path / 'scans.db'}"
    else:
        db = request.getfixturevalue("pg_url")
        extra["REDIS_URL"] = request.getfixturevalue("redis_url")
    upgrade(db)
    env = base_env(
        db,
        tmp_path,
        SCANQUEUE_RUNNER="tests.runners:progress_runner",
        SCANQUEUE_API_TOKEN=TOKEN,
        **extra,
    )
    start_worker(procs, env, tmp_path)
    url = _start_serve(env, tmp_path, procs)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200, health.text

    watcher = SSEClient(url, headers=auth)
    assert watcher.subscribed.wait(15) and watcher.status == 200
    posted_at = time.monotonic()
    created = httpx.post(
        f"{url}/api/v1/scans",
        json={"providers": ["aws", "gcp", "azure"], "frameworks": ["soc2"], "user": "e2e"},
        headers=auth,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    scan_id = created.json()["id"]

    def types() -> list[str]:
        return [e["type"] for e in watcher.events if e["scan_id"] == scan_id]

    wait_for(lambda: "scan.completed" in types(), 60, what="scan.completed over SSE")
    completed_after = time.monotonic() - posted_at
    assert types() == [
        "scan.queued",  # the bridge saw the row (docs/reference.md#policies)
        "scan.started",
        "scan.progress",
        "scan.finding",
        "scan.finding",
        "scan.finding",
        "scan.progress",
        "scan.completed",
    ]
    mine = [e for e in watcher.events if e["scan_id"] == scan_id]
    assert all(e["attempt"] == 1 for e in mine if e["type"] != "scan.queued")
    assert [e["resource"] for e in mine if e["type"] == "scan.finding"] == ["aws", "gcp", "azure"]
    assert mine[-1]["findings_count"] == 3
    assert TOKEN not in json.dumps(watcher.events)
    scan = httpx.get(f"{url}/api/v1/scans/{scan_id}", headers=auth, timeout=10).json()
    assert scan["status"] == "completed" and scan["findings_count"] == 3
    assert httpx.post(f"{url}/api/v1/scans/{scan_id}/cancel", headers=auth).status_code == 409

    # A late subscriber resumes from the first event and gets the whole run again.
    replay = SSEClient(url, headers={**auth, "Last-Event-ID": watcher.ids[0]})
    assert [e["type"] for e in replay.wait(len(mine) - 1) if e["scan_id"] == scan_id] == types()[1:]
    replay.close()

    refused = httpx.post(f"{url}/api/v1/scans", json={"providers": []}, headers=auth, timeout=10)
    assert refused.status_code == 422
    print(f"\n{deployment}: POST to scan.completed over SSE: {completed_after * 1000:.0f} ms")

    # SIGTERM with a stream still open: the server ends the stream and exits promptly.
    serve = procs[-1]
    stopped_at = time.monotonic()
    serve.signal_group(signal.SIGTERM)
    serve.proc.wait(15)
    assert time.monotonic() - stopped_at < 8
    assert serve.proc.returncode == 0, serve.output()[-2000:]
    watcher.close()


@pytest.mark.slow
def test_cancel_through_the_api_is_streamed(
    sqlite_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """Embedded default (SQLite, table events, no Redis): cancel a queued scan."""
    upgrade(sqlite_url)
    env = base_env(sqlite_url, tmp_path)
    url = _start_serve(env, tmp_path, procs)
    watcher = SSEClient(url)
    assert watcher.subscribed.wait(15) and watcher.status == 200
    scan_id = httpx.post(f"{url}/api/v1/scans", json={"providers": ["aws"]}, timeout=10).json()[
        "id"
    ]
    response = httpx.post(f"{url}/api/v1/scans/{scan_id}/cancel", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    (event,) = watcher.wait(1)
    assert event["type"] == "scan.canceled" and event["scan_id"] == scan_id
    assert event["reason"] == "canceled by request"
    watcher.close()


def test_serve_gives_up_on_an_unreachable_database(tmp_path: Path) -> None:
    env = base_env(
        f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x",
        tmp_path,
        SCANQUEUE_CONNECT_TIMEOUT="1",
    )
    result = run_cli(env, "serve", "--port", str(free_port()), timeout=30)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("scanqueue: giving up after 1s: cannot reach database")
    assert "hunter2" not in result.stderr + result.stdout


def test_serve_takes_port_from_the_environment(
    sqlite_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(sqlite_url)
    bad = run_cli(base_env(sqlite_url, tmp_path, PORT="eighty"), "serve")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "scanqueue: PORT: expected a port number, got 'eighty'"
    port = free_port()
    proc = Proc(
        [str(BIN / "scanqueue"), "serve"],
        # 0.0.0.0 without a token is refused (secure by default): a platform sets one.
        base_env(sqlite_url, tmp_path, PORT=str(port), SCANQUEUE_API_TOKEN=TOKEN),
        tmp_path,
        "serve",
    )
    procs.append(proc)
    # Platforms that hand out $PORT route to the container's interface, not loopback.
    proc.wait_for_output(f"Uvicorn running on http://0.0.0.0:{port}", timeout=30)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


# -- the page in a real browser ------------------------------------------------------------------

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _chromium() -> str:
    # Skips locally without Chromium, fails in CI (scripts/test.sh installs it).
    from tests.browser import chromium_path

    return chromium_path()


@pytest.mark.slow
@pytest.mark.parametrize("with_token", [False, True], ids=["eventsource", "token"])
def test_page_shows_a_new_scan_turn_completed_without_reload(
    with_token: bool, pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    upgrade(pg_url)
    extra = {"SCANQUEUE_API_TOKEN": TOKEN} if with_token else {}
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_RUNNER="tests.runners:journal_runner",
        SCANQUEUE_TEST_RUN_SECONDS="1.5",
        **extra,
    )
    start_worker(procs, env, tmp_path)
    url = _start_serve(env, tmp_path, procs)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url + "/")
            if with_token:
                page.wait_for_selector("#auth", state="visible")
                page.fill("#token", TOKEN)
                page.click("#auth button")
            page.wait_for_selector("#conn[data-state='live']")
            page.evaluate("window.__notReloaded = true")

            if with_token:  # through the page's own form, which posts to the API
                page.fill("#providers", "aws, gcp")
                page.fill("#frameworks", "soc2")
                page.click("#enqueue-button")
                page.wait_for_selector("#scans tr")
                scan_id = page.get_attribute("#scans tr td.id", "title")
            else:
                created = httpx.post(
                    f"{url}/api/v1/scans", json={"providers": ["aws", "gcp"]}, timeout=10
                )
                assert created.status_code == 201
                scan_id = created.json()["id"]
            assert scan_id
            row = f"#scan-{scan_id}"
            page.wait_for_selector(row)
            page.wait_for_selector(f"{row}[data-status='running']")
            page.wait_for_selector(f"{row}[data-status='completed']")
            assert page.inner_text(f"{row} td.status") == "completed"
            assert page.inner_text(f"{row} td.findings") == "2"
            assert "scan.completed" in page.inner_text("#events")
            assert page.evaluate("window.__notReloaded") is True
        finally:
            browser.close()


def test_a_stream_survives_a_redis_restart(redis_server: Any, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(db)
    settings = api_settings(db, REDIS_URL=redis_server.url)
    sink = event_sink_for(settings)
    with LiveServer(settings, heartbeat_s=0.5) as server:
        watcher = _subscribe(server)
        sink.emit("scan.progress", "s", {"n": 1})
        watcher.wait(1)
        redis_server.stop()
        time.sleep(1.5)
        redis_server.start()
        wait_for(lambda: sink.emit("scan.progress", "s", {"n": 2}), 10, what="an emit")
        assert [e["n"] for e in watcher.wait(2)] == [1, 2]
        assert watcher.error is None
        watcher.close()
