"""Lineage terminal events survive the end of a pool process (issue 14 item 7).

A pool process leaves with ``os._exit``, which skips ``atexit`` and kills the
sender thread with whatever it still had queued; and a run terminated by the
fence ends with a SIGKILL.  Both must still deliver the run's terminal event.
Real workers, a real HTTP receiver, PostgreSQL (behind a stallable proxy for
the fence) and Redis.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanqueue.observe.lineage import run_id
from tests.conftest import Proc, base_env, insert_rows, scan_rows, start_worker, upgrade, wait_for
from tests.integration.test_lineage import Receiver, isolated_openlineage_env  # noqa: F401 - fixture
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


class SlowReceiver(Receiver):
    """Takes ``delay_s`` to answer each event: the sender is mid-send when work ends."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        handler = self.server.RequestHandlerClass
        original = handler.do_POST  # type: ignore[attr-defined]

        def slow_post(this: object) -> None:
            time.sleep(delay_s)
            original(this)

        handler.do_POST = slow_post  # type: ignore[attr-defined]


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    p = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield p
    p.close()


def test_a_pool_process_that_exits_sends_its_queued_terminal_event_first(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    receiver = SlowReceiver(delay_s=1.0)
    try:
        env = base_env(
            pg_url,
            tmp_path,
            REDIS_URL=redis_url,
            SCANQUEUE_RUNNER="tests.runners:journal_runner",
            SCANQUEUE_TEST_RUN_SECONDS="0.2",
            OPENLINEAGE_URL=receiver.url,
        )
        worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
        insert_rows(pg_url, ["exit-flush"])
        wait_for(lambda: scan_rows(pg_url)["exit-flush"]["status"] == "completed", 30)
        # COMPLETE is queued behind START (each takes the receiver 1 s): shut down now.
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0
        kinds = [e["eventType"] for e in receiver.of("exit-flush")]
        assert kinds == ["START", "COMPLETE"], kinds
    finally:
        receiver.close()


def test_a_run_terminated_by_the_fence_gets_its_abort(
    pg_url: str, redis_url: str, proxy: TcpProxy, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    receiver = Receiver()
    try:
        env = base_env(
            proxy.url_for(pg_url),
            tmp_path,
            REDIS_URL=redis_url,
            SCANQUEUE_LEASE_SECONDS="6",
            SCANQUEUE_CANCEL_GRACE_SECONDS="1",
            SCANQUEUE_RUNNER="tests.runners:ignoring_runner",  # never looks at ctx
            SCANQUEUE_TEST_RUN_SECONDS="60",
            OPENLINEAGE_URL=receiver.url,
        )
        worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
        insert_rows(pg_url, ["fenced"])
        wait_for(lambda: len(receiver.of("fenced")) >= 1, 30, what="START")
        proxy.stall()
        t0 = time.monotonic()
        wait_for(lambda: len(receiver.of("fenced")) >= 2, 15, what="ABORT")
        took = time.monotonic() - t0
        start, abort = receiver.of("fenced")
        assert [start["eventType"], abort["eventType"]] == ["START", "ABORT"]
        assert abort["run"]["runId"] == run_id("fenced", 1)
        wait_for(lambda: "ending pool process" in worker.output(), 10, what="the termination")
        assert took < 6  # before the lease (6 s) could pass to another worker
        print(f"\nFENCE ABORT sent {took:.2f}s after the database stalled (lease 6 s)")
    finally:
        proxy.resume()
        receiver.close()
