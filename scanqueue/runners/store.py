"""Every SQL statement of the real runner: ``providers``, ``checks_state`` and ``findings``.

Writes of a run's findings are fenced by the run's lease: each batch (and the
clean-up at the start and after a failure) commits only while the scan is
still ``running`` with that run's attempt number, checked inside the same
transaction after the write — with a row lock on PostgreSQL, and under
SQLite's single-writer lock — so a zombie run can never add findings to, or
delete them from, a newer run of the same scan.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, or_, select, update
from sqlalchemy import exc as sa_exc

from scanqueue.db.rows import iso
from scanqueue.db.schema import STATUS_RUNNING, checks_state, db_now, findings, providers, scans
from scanqueue.db.store import Store
from scanqueue.errors import ConflictError, NotFoundError, ScanqueueError
from scanqueue.runners.diff import FINDING_STATES, STATE_FIXED, DiffCounts, compute_diff
from scanqueue.runners.fingerprint import finding_fingerprint
from scanqueue.runners.providers.base import Finding


class LeaseLostError(ScanqueueError):
    """The run no longer owns its scan: nothing it writes is kept."""


@dataclass(frozen=True)
class ProviderRow:
    name: str
    kind: str
    config: Any  # as stored: normally an object, but another program may write anything
    enabled: bool
    created_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "config": self.config,
            "enabled": self.enabled,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class CheckRow:
    check_id: str
    enabled: bool
    updated_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "check_id": self.check_id,
            "enabled": self.enabled,
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True)
class FindingRow:
    id: int
    scan_id: str
    check_id: str
    provider: str
    severity: str | None
    status: str | None
    resource: str | None
    location: str | None
    title: str | None
    message: str | None
    frameworks: list[str]
    created_at: datetime | None
    fingerprint: str | None = None
    state: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scan_id": self.scan_id,
            "check_id": self.check_id,
            "provider": self.provider,
            "severity": self.severity,
            "status": self.status,
            "resource": self.resource,
            "location": self.location,
            "title": self.title,
            "message": self.message,
            "frameworks": self.frameworks,
            "created_at": iso(self.created_at),
            "fingerprint": self.fingerprint,
            "state": self.state,
        }


def _json_value(raw: Any) -> Any:
    # SQLite hands back the stored text; PostgreSQL a parsed jsonb value.
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


class RunnerStore:
    """The real runner's tables, on the engine (and error handling) of a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dialect = store.dialect

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.store._tx() as conn:
            yield conn

    # -- providers --------------------------------------------------------------------

    def add_provider(
        self, name: str, kind: str, config: dict[str, Any], enabled: bool = True
    ) -> ProviderRow:
        try:
            with self._tx() as conn:
                row = conn.execute(
                    insert(providers)
                    .values(name=name, kind=kind, config=config, enabled=enabled)
                    .returning(*providers.c)
                ).one()
        except sa_exc.IntegrityError:
            raise ConflictError(f"provider {name!r} already exists") from None
        return _provider(row)

    def list_providers(self) -> list[ProviderRow]:
        with self._tx() as conn:
            rows = conn.execute(select(providers).order_by(providers.c.name)).all()
        return [_provider(r) for r in rows]

    def get_providers(self, names: Sequence[str]) -> dict[str, ProviderRow]:
        if not names:
            return {}
        with self._tx() as conn:
            rows = conn.execute(select(providers).where(providers.c.name.in_(list(names)))).all()
        return {r.name: _provider(r) for r in rows}

    def remove_provider(self, name: str) -> None:
        with self._tx() as conn:
            result = conn.execute(delete(providers).where(providers.c.name == name))
        if result.rowcount == 0:
            raise NotFoundError(f"no provider named {name!r}")

    def set_provider_enabled(self, name: str, enabled: bool) -> ProviderRow:
        with self._tx() as conn:
            row = conn.execute(
                update(providers)
                .where(providers.c.name == name)
                .values(enabled=enabled)
                .returning(*providers.c)
            ).first()
        if row is None:
            raise NotFoundError(f"no provider named {name!r}")
        return _provider(row)

    # -- checks -----------------------------------------------------------------------

    def set_check(self, check_id: str, enabled: bool) -> CheckRow:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        now = db_now(self.dialect)
        stmt = upsert(checks_state).values(check_id=check_id, enabled=enabled, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[checks_state.c.check_id],
            set_={"enabled": enabled, "updated_at": now},
        )
        with self._tx() as conn:
            row = conn.execute(stmt.returning(*checks_state.c)).one()
        return CheckRow(row.check_id, bool(row.enabled), row.updated_at)

    def list_checks(self) -> list[CheckRow]:
        with self._tx() as conn:
            rows = conn.execute(select(checks_state).order_by(checks_state.c.check_id)).all()
        return [CheckRow(r.check_id, bool(r.enabled), r.updated_at) for r in rows]

    def disabled_checks(self) -> set[str]:
        with self._tx() as conn:
            rows = conn.execute(
                select(checks_state.c.check_id).where(checks_state.c.enabled.is_(False))
            ).all()
        return {r.check_id for r in rows}

    # -- findings ---------------------------------------------------------------------

    def replace_findings(self, scan_id: str, attempt: int) -> int:
        """Delete the scan's findings and its diff (a new run starts afresh); fenced."""
        with self._tx() as conn:
            result = conn.execute(delete(findings).where(findings.c.scan_id == scan_id))
            conn.execute(
                update(scans)
                .where(scans.c.id == scan_id)
                .values(findings_new=None, findings_fixed=None)
            )
            self._fence(conn, scan_id, attempt)
        return int(result.rowcount)

    def write_diff(self, scan_id: str, attempt: int) -> DiffCounts:
        """Compare the run's findings with the baseline's (docs/reference.md#findings-over-time),
        in one fenced
        transaction: a run that no longer owns the scan writes no states and no counts."""
        with self._tx() as conn:
            self._fence(conn, scan_id, attempt)  # first: PostgreSQL holds the row lock now
            counts = compute_diff(conn, scan_id)
            self._fence(conn, scan_id, attempt)
        return counts

    def add_findings(
        self, scan_id: str, attempt: int, provider: str, batch: Sequence[Finding]
    ) -> int:
        """Store one batch of run ``attempt``'s findings; LeaseLostError if not ours."""
        if not batch:
            return 0
        rows = [
            {
                "scan_id": scan_id,
                "check_id": f.check_id,
                "provider": provider,
                "frameworks": list(f.frameworks),
                "resource": f.resource,
                "severity": f.severity,
                "status": f.status,
                "title": f.title,
                "message": f.message,
                "location": f.location,
                "fingerprint": finding_fingerprint(f),
            }
            for f in batch
        ]
        with self._tx() as conn:
            conn.execute(insert(findings), rows)
            self._fence(conn, scan_id, attempt)
        return len(rows)

    def _fence(self, conn: Connection, scan_id: str, attempt: int) -> None:
        # After the write: on SQLite the write already holds the database lock, so
        # this read is current; on PostgreSQL FOR UPDATE makes a concurrent
        # re-queue wait for our commit (and then see, and delete, our rows).
        owned = conn.execute(
            select(scans.c.id)
            .where(
                scans.c.id == scan_id,
                scans.c.status == STATUS_RUNNING,
                scans.c.attempts == attempt,
            )
            .with_for_update()
        ).first()
        if owned is None:
            raise LeaseLostError(
                f"scan {scan_id} attempt {attempt} no longer owns the scan; findings not written"
            )

    def list_findings(
        self,
        scan_id: str,
        state: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[FindingRow]:
        """The scan's findings in the order stored; ``state`` filters by diff state.

        Without ``state``: what the scan found (every row but the ``fixed`` ones,
        which are the baseline's findings this scan no longer found).
        """
        stmt = select(findings).where(findings.c.scan_id == scan_id, self._state_filter(state))
        stmt = stmt.order_by(findings.c.id).offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._tx() as conn:
            rows = conn.execute(stmt).all()
        return [_finding(r) for r in rows]

    @staticmethod
    def _state_filter(state: str | None) -> Any:
        if state is None:
            return or_(findings.c.state.is_(None), findings.c.state != STATE_FIXED)
        if state not in FINDING_STATES:
            raise ValueError(f"state must be one of {', '.join(FINDING_STATES)}, not {state!r}")
        return findings.c.state == state

    def count_findings(self, scan_id: str, state: str | None = None) -> int:
        """How many findings :meth:`list_findings` would return without paging."""
        with self._tx() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(findings)
                    .where(findings.c.scan_id == scan_id, self._state_filter(state))
                ).scalar_one()
            )


def _finding(r: Any) -> FindingRow:
    return FindingRow(
        id=r.id,
        scan_id=r.scan_id,
        check_id=r.check_id,
        provider=r.provider,
        severity=r.severity,
        status=r.status,
        resource=r.resource,
        location=r.location,
        title=r.title,
        message=r.message,
        frameworks=list(_json_value(r.frameworks) or []),
        created_at=r.created_at,
        fingerprint=r.fingerprint,
        state=r.state,
    )


def _provider(row: Any) -> ProviderRow:
    config = _json_value(row.config)
    return ProviderRow(
        name=row.name,
        kind=row.kind,
        # Kept as it is: a malformed config must show (and fail the scan) as what it
        # is, not as an empty object.
        config=config,
        enabled=bool(row.enabled),
        created_at=row.created_at,
    )
