"""Webhooks end to end: a real worker (with its embedded bridge as leader) and a
receiver that hangs, then recovers.  Runs never wait for a receiver, and every
finished scan still arrives, signed, once the receiver answers again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import (
    Proc,
    all_finished,
    base_env,
    free_port,
    insert_rows,
    run_cli,
    start_worker,
    upgrade,
    wait_for,
)
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

SECRET = "e2e-webhook-secret"


def test_a_hanging_receiver_delays_no_run_and_gets_every_scan_once_it_recovers(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(url, tmp_path, SCANQUEUE_POLL_EVERY="0.2")
    receiver = Receiver(free_port(), mode="hang", hang_s=60).start()
    try:
        added = run_cli(env, "webhooks", "add", receiver.url, "--secret", SECRET)
        assert added.returncode == 0, added.stderr
        start_worker(procs, env, tmp_path, "--autoscale=2,2")
        ids = [f"w{i}" for i in range(3)]
        started = time.monotonic()
        for scan_id in ids:
            insert_rows(url, [scan_id])
        wait_for(lambda: all_finished(url, 3), 20, interval=0.1, what="3 scans finished")
        took = time.monotonic() - started
        # The receiver has them (hanging) while the runs are long done.
        wait_for(lambda: receiver.arrivals >= 1, 15, what="a POST hanging at the receiver")
        assert not receiver.requests()  # none answered yet
        insert_rows(url, ["w-late"])
        late = time.monotonic()
        wait_for(lambda: all_finished(url, 4), 20, interval=0.1, what="a later scan finished")
        print(f"3 scans in {took:.1f}s, a later one in {time.monotonic() - late:.1f}s")
        assert took < 15 and time.monotonic() - late < 10
        receiver.mode = "ok"
        receiver._release.set()  # hung requests answer now; the sender timed out on some
        wait_for(
            lambda: set(receiver.delivered()) == {*ids, "w-late"},
            60,
            interval=0.5,
            what="every scan delivered",
        )
    finally:
        receiver.stop()
    for request in receiver.requests():
        assert request.signature_ok(SECRET)
        assert request.json["status"] == "completed"
    listed = run_cli(env, "webhooks", "list", "--json")
    assert SECRET not in listed.stdout
