"""Retention on the leader's maintenance tick, end to end: a real `scanqueue bridge`
with SCANQUEUE_RETAIN_DAYS prunes an old history by the rules and counts it in
`scanqueue_pruned_total` on its /metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from scanqueue.config import normalize_database_url
from scanqueue.db.store import store_for
from tests.conftest import Proc, base_env, free_port, start_bridge, upgrade, wait_for
from tests.integration.test_retention import HISTORY, PRUNED, build_history, snapshot

pytestmark = pytest.mark.slow


def test_the_leader_bridge_prunes_by_the_rules_and_counts_it(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    store = store_for(normalize_database_url(url))
    build_history(store)
    port = free_port()
    env = base_env(
        url,
        tmp_path,
        SCANQUEUE_RETAIN_DAYS="30",
        SCANQUEUE_RETAIN_PER_KEY="2",
        SCANQUEUE_METRICS_PORT=str(port),
    )
    start_bridge(procs, env, tmp_path)
    wait_for(
        lambda: set(snapshot(store)["scans"]) == set(HISTORY) - PRUNED,
        30,
        interval=0.5,
        what="the old scans pruned",
    )

    def pruned_samples() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith("scanqueue_pruned_total")
        }

    # The counters move after the pass commits: a moment after the rows are gone.
    def all_three() -> dict[str, float] | None:
        found = pruned_samples()
        return found if len(found) == 3 else None

    samples = wait_for(all_three, 10, interval=0.2, what="the pruned counters")
    assert samples == {
        'scanqueue_pruned_total{what="scans"}': 5.0,
        'scanqueue_pruned_total{what="findings"}': 15.0,
        'scanqueue_pruned_total{what="events"}': 5.0,
    }
