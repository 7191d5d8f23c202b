"""Runners the tests load into real workers with SCANQUEUE_RUNNER=tests.runners:…

They record what happened in a journal file (``SCANQUEUE_TEST_JOURNAL``), one
JSON line per start and end, so a test can prove that no scan ran twice at once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from scanqueue import Job, ScanContext, ScanResult


def _journal(kind: str, job: Job, **extra: Any) -> None:
    path = os.environ.get("SCANQUEUE_TEST_JOURNAL")
    if not path:
        return
    entry = {"kind": kind, "scan_id": job.scan_id, "attempt": job.attempt, "pid": os.getpid()}
    entry.update(extra, t=time.time())
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()


def _seconds(default: float) -> float:
    return float(os.environ.get("SCANQUEUE_TEST_RUN_SECONDS", default))


def journal_runner(job: Job, ctx: ScanContext) -> ScanResult:
    """Sleeps SCANQUEUE_TEST_RUN_SECONDS (cooperatively), journalling start and end."""
    _journal("start", job)
    stopped = ctx.wait(_seconds(0.05))
    _journal("end", job, stopped=stopped)
    return ScanResult(findings_count=len(job.providers_scanned))


def ignoring_runner(job: Job, ctx: ScanContext) -> ScanResult:
    """Ignores every stop signal: sleeps in small steps without looking at ctx."""
    _journal("start", job)
    deadline = time.monotonic() + _seconds(60)
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _journal("end", job, stopped=ctx.cancelled)
    return ScanResult(findings_count=1)


def failing_runner(job: Job, ctx: ScanContext) -> None:
    raise RuntimeError(f"scanner exploded on {','.join(job.providers_scanned)}")


def flaky_runner(job: Job, ctx: ScanContext) -> ScanResult:
    """Fails its first SCANQUEUE_TEST_FAILURES attempts (default 2), then completes."""
    _journal("start", job)
    if job.attempt <= int(os.environ.get("SCANQUEUE_TEST_FAILURES", "2")):
        raise RuntimeError(f"throttled on attempt {job.attempt}")
    return ScanResult(findings_count=1)


def progress_runner(job: Job, ctx: ScanContext) -> ScanResult:
    ctx.progress("starting", percent=0)
    for i, provider in enumerate(job.providers_scanned):
        ctx.finding(check_id=f"check-{i}", resource=provider, severity="low")
    ctx.progress("done", percent=100)
    return ScanResult(findings_count=len(job.providers_scanned))


class TokenEchoRunner:
    """Fails with a message that does not contain the token, but logs that it saw one."""

    def run(self, job: Job, ctx: ScanContext) -> ScanResult:
        _journal("start", job, has_token=job.triggered_by_token is not None)
        return ScanResult(findings_count=0)


not_a_runner = 42
