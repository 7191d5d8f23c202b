"""The Prometheus multiprocess directory under autoscale churn (issue 14 item 8).

Hundreds of grow/shrink cycles are simulated as a prefork pool produces them:
forked processes that record a run (counter, histogram, live gauge), then leave
through the same hook a pool process uses (``mark_process_dead``).  The worker's
main process compacts: the directory stays as small as the live processes need,
and every total survives.  Runs in a child interpreter, so this test's metrics
never mix with the pytest process's registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CYCLES = int(os.environ.get("SCANQUEUE_TEST_CHURN_CYCLES", "300"))

SCRIPT = r"""
import json, os, sys
from pathlib import Path

os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
cycles = int(sys.argv[2])
from scanqueue.observe import metrics, metrics_multiprocess
from scanqueue.observe.observer import RunInfo

metrics_multiprocess.prepare_multiprocess_dir()
metrics.report_pool(2, 0)  # the main process's own live gauge
directory = Path(sys.argv[1])


def usage():
    files = list(directory.glob("*.db"))
    return len(files), sum(f.stat().st_blocks * 512 for f in files)


peak_files = peak_bytes = 0
before = None
for cycle in range(cycles):
    pid = os.fork()
    if pid == 0:
        try:
            observer = metrics.MetricsObserver()
            run = RunInfo(scan_id=f"s{cycle}", attempt=1, providers=[], frameworks=[])
            observer.started(run)
            observer.canceled(run, 0.5) if cycle % 3 == 0 else observer.discarded(run, 2.0)
            metrics.report_pool(3, 1)
            metrics_multiprocess.mark_process_dead(os.getpid())  # as worker_process_shutdown does
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    if cycle == 49:
        before = usage()  # 50 cycles without compaction
        metrics_multiprocess.compact_multiprocess_dir()
    elif cycle > 49 and cycle % 25 == 0:
        metrics_multiprocess.compact_multiprocess_dir()
    if cycle > 49:
        files, size = usage()
        peak_files, peak_bytes = max(peak_files, files), max(peak_bytes, size)
metrics_multiprocess.compact_multiprocess_dir()
after = usage()

from prometheus_client import generate_latest

text = generate_latest(metrics.registry()).decode()
values = {}
for line in text.splitlines():
    if line.startswith(("scanqueue_scans_started_total", "scanqueue_scans_finished_total",
                        "scanqueue_scan_duration_seconds_count", "scanqueue_scan_duration_seconds_sum",
                        "scanqueue_worker_pool_processes")):
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
print(json.dumps({"before": before, "after": after, "peak_files": peak_files,
                  "peak_bytes": peak_bytes, "values": values,
                  "names": sorted(f.name for f in directory.glob("*.db"))}))
"""


def test_hundreds_of_grow_shrink_cycles_keep_the_directory_small_and_the_totals(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "prom"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(directory), str(CYCLES)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    values = result["values"]
    canceled = len(range(0, CYCLES, 3))
    assert values["scanqueue_scans_started_total"] == CYCLES
    assert values['scanqueue_scans_finished_total{status="canceled"}'] == canceled
    assert values['scanqueue_scans_finished_total{status="discarded"}'] == CYCLES - canceled
    assert values["scanqueue_scan_duration_seconds_count"] == CYCLES
    assert values["scanqueue_scan_duration_seconds_sum"] == 0.5 * canceled + 2.0 * (
        CYCLES - canceled
    )
    # Only the live main process's gauge remains, not 3 from any dead child.
    assert values["scanqueue_worker_pool_processes"] == 2
    files_after, bytes_after = result["after"]
    files_before, bytes_before = result["before"]
    # The main process's own files and one archive per kind; no dead process's files.
    assert files_after <= 6, result["names"]
    assert files_before >= 100 and result["peak_files"] <= 60
    print(
        f"\nCHURN {CYCLES} grow/shrink cycles: {files_before} files / {bytes_before >> 10} KiB "
        f"after 50 cycles uncompacted; {files_after} files / {bytes_after >> 10} KiB after "
        f"compaction (peak {result['peak_files']} files with compaction every 25 cycles)"
    )
