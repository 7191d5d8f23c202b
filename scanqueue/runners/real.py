"""The real runner, ``SCANQUEUE_RUNNER=scanqueue:ScanRunner`` (docs/reference.md#runner-api, "The
real runner").

A scan's ``providers_scanned`` names rows of ``providers``; each row's kind
builds a collector (:mod:`scanqueue.runners.providers`).  The runner clears the scan's
previous findings, runs the collectors one after another, drops findings of
checks disabled in ``checks_state`` and of frameworks the scan did not ask
for, stores the rest in batches (each reported through ``ctx.finding``),
looks at ``ctx.cancelled`` between batches, compares what it stored with the
baseline (:mod:`scanqueue.runners.diff`: each finding's state, the fixed ones,
``findings_new`` / ``findings_fixed``), and returns how many it stored.

Any failure fails the scan with a message naming the provider, and the
findings this run had stored are removed again: a failed run leaves none.
This module owns that orchestration only; SQL lives in
:mod:`scanqueue.runners.store`, scanners in :mod:`scanqueue.runners.providers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from scanqueue.config import Settings
from scanqueue.db.store import store_for
from scanqueue.runners.api import Job, ScanContext, ScanResult
from scanqueue.runners.providers.base import Collector, Finding, ProviderError, build_collector
from scanqueue.runners.store import LeaseLostError, RunnerStore

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 200


class ScanRunner:
    """Runs the providers a scan names and persists their findings."""

    batch_size: int = DEFAULT_BATCH_SIZE

    def __init__(self) -> None:
        # Read lazily: the class is built when the worker starts, the database is
        # opened in whichever (forked) process runs the scan.
        self._settings: Settings | None = None

    def __repr__(self) -> str:
        return "ScanRunner()"

    def _runner_store(self) -> RunnerStore:
        if self._settings is None:
            self._settings = Settings.from_env()
        return RunnerStore(store_for(self._settings.database_url))

    def run(self, job: Job, ctx: ScanContext) -> ScanResult:
        rs = self._runner_store()
        rs.replace_findings(job.scan_id, job.attempt)
        try:
            stored = self._run(rs, job, ctx)
            if not ctx.cancelled:
                # Before the run completes, fenced like every findings write: a
                # run that lost its lease writes no diff (docs/reference.md#findings-over-time).
                rs.write_diff(job.scan_id, job.attempt)
        except LeaseLostError:
            raise  # what is stored belongs to the newer run now: leave it alone
        except Exception:
            try:
                rs.replace_findings(job.scan_id, job.attempt)
            except Exception as cleanup:
                log.warning("scan %s: could not remove partial findings: %s", job.scan_id, cleanup)
            raise
        return ScanResult(findings_count=stored)

    def _run(self, rs: RunnerStore, job: Job, ctx: ScanContext) -> int:
        collectors = self._collectors(rs, job.providers_scanned)
        disabled = rs.disabled_checks()
        wanted = {f.casefold() for f in job.frameworks_scanned}
        stored = 0
        for step, (name, collector) in enumerate(collectors, start=1):
            if ctx.cancelled:
                break
            ctx.progress(
                f"running provider {name}",
                provider=name,
                step=step,
                steps=len(collectors),
                findings=stored,
            )
            stored += self._collect(rs, job, ctx, name, collector, disabled, wanted)
        if ctx.cancelled:
            log.info("scan %s stopped after %d stored findings", job.scan_id, stored)
        else:
            ctx.progress("done", percent=100, findings=stored)
        return stored

    def _collectors(self, rs: RunnerStore, names: Sequence[str]) -> list[tuple[str, Collector]]:
        if not names:
            raise ProviderError("the scan names no providers")
        rows = rs.get_providers(names)
        built: list[tuple[str, Collector]] = []
        for name in dict.fromkeys(names):
            row = rows.get(name)
            if row is None:
                raise ProviderError(f"unknown provider {name!r}")
            if not row.enabled:
                raise ProviderError(f"provider {name!r} is disabled")
            built.append((name, build_collector(name, row.kind, row.config)))
        return built

    def _collect(
        self,
        rs: RunnerStore,
        job: Job,
        ctx: ScanContext,
        name: str,
        collector: Collector,
        disabled: set[str],
        wanted: set[str],
    ) -> int:
        stored = 0
        batch: list[Finding] = []
        try:
            iterator = iter(collector.collect(ctx))
        except ProviderError:
            raise
        except Exception as exc:
            raise _failure(name, exc) from exc
        try:
            while True:
                try:
                    finding = next(iterator)
                except StopIteration:
                    break
                except ProviderError:
                    raise
                except Exception as exc:
                    raise _failure(name, exc) from exc
                if not _keep(finding, disabled, wanted):
                    continue
                batch.append(finding)
                if len(batch) >= self.batch_size:
                    stored += self._flush(rs, job, ctx, name, batch)
                    batch = []
                    if ctx.cancelled:
                        return stored
            if batch and not ctx.cancelled:
                stored += self._flush(rs, job, ctx, name, batch)
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()  # a generator ends its scanner process here
        return stored

    def _flush(
        self, rs: RunnerStore, job: Job, ctx: ScanContext, name: str, batch: list[Finding]
    ) -> int:
        count = rs.add_findings(job.scan_id, job.attempt, name, batch)
        for finding in batch:
            ctx.finding(**_event_payload(name, finding))
        return count


def _failure(provider: str, exc: Exception) -> ProviderError:
    return ProviderError(f"provider {provider!r} failed: {type(exc).__name__}: {exc}")


def _keep(finding: Finding, disabled: set[str], wanted: set[str]) -> bool:
    if finding.check_id in disabled:
        return False
    if not wanted or not finding.frameworks:
        return True
    return any(f.casefold() in wanted for f in finding.frameworks)


def _event_payload(provider: str, finding: Finding) -> dict[str, Any]:
    return {
        "check_id": finding.check_id,
        "provider": provider,
        "severity": finding.severity,
        "status": finding.status,
        "resource": finding.resource,
        "location": finding.location,
        "title": finding.title,
        "message": finding.message,
        "frameworks": list(finding.frameworks),
    }
