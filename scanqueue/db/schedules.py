"""Schedules as rows (docs/reference.md#schedules): the statements behind ``scanqueue schedules``
and firing.

Owns ``scan_schedules`` and the scans a schedule makes.  Firing is one
transaction per schedule (:meth:`SchedulesMixin.advance_schedule`):

1. a compare-and-set moves ``next_run_at`` on from the value the leader read —
   of two leaders (or a leader and the one that replaced it) only one wins;
2. the winner inserts the scan with ``schedule_name`` and ``scheduled_for``
   under ``INSERT … ON CONFLICT DO NOTHING``: the UNIQUE index on the pair
   makes a second scan for one fire time impossible, whoever tries.

So a scan is made at most once per (schedule, fire time), and the fire time is
either made or deliberately skipped by exactly one replica.  What to fire
(which fire time, catch-up or skip) is decided above, in
:mod:`scanqueue.dispatch.schedules`; this module only makes it so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy import exc as sa_exc

from scanqueue.db.engine import StoreBase
from scanqueue.db.keys import effective_key
from scanqueue.db.rows import decode_json, iso, new_scan_id
from scanqueue.db.schedule_spec import ScheduleSpec, Timing
from scanqueue.db.schema import STATUS_QUEUED, STATUS_RUNNING, scan_schedules, scans
from scanqueue.errors import ConflictError, NotFoundError, ScanqueueError

DUE_BATCH = 100  # schedules fired per tick at most; the next tick goes on


class SchedulesNotMigrated(ScanqueueError):
    """The schema predates schedules (code rolled out before ``scanqueue db upgrade``)."""


@dataclass(frozen=True)
class ScheduleRow:
    """A schedule as users see it."""

    name: str
    cron: str | None
    every_seconds: int | None
    tz: str
    providers: Any
    frameworks: Any
    priority: int
    scan_key: str | None
    on_missed: str
    on_overlap: str
    paused: bool
    next_run_at: datetime | None
    last_fired_at: datetime | None
    last_scan_id: str | None
    created_at: datetime | None

    @classmethod
    def from_mapping(cls, m: Mapping[Any, Any]) -> ScheduleRow:
        return cls(
            name=m["name"],
            cron=m["cron"],
            every_seconds=m["every_seconds"],
            tz=m["tz"] or "UTC",
            providers=decode_json(m["providers"]) or [],
            frameworks=decode_json(m["frameworks"]) or [],
            priority=m["priority"] or 0,
            scan_key=m["scan_key"],
            on_missed=m["on_missed"],
            on_overlap=m["on_overlap"],
            paused=bool(m["paused"]),
            next_run_at=m["next_run_at"],
            last_fired_at=m["last_fired_at"],
            last_scan_id=m["last_scan_id"],
            created_at=m["created_at"],
        )

    @property
    def timing(self) -> Timing:
        return Timing(self.cron, self.every_seconds, self.tz)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cron": self.cron,
            "every_seconds": self.every_seconds,
            "tz": self.tz,
            "providers": self.providers,
            "frameworks": self.frameworks,
            "priority": self.priority,
            "key": self.scan_key,
            "on_missed": self.on_missed,
            "on_overlap": self.on_overlap,
            "paused": self.paused,
            "next_run_at": iso(self.next_run_at),
            "last_fired_at": iso(self.last_fired_at),
            "last_scan_id": self.last_scan_id,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class Advance:
    """What one firing attempt did.

    ``outcome``: ``fired`` (``scan_id`` made), ``overlap`` (the previous scan,
    ``previous_scan_id``, is still queued or running: none made), ``advanced``
    (``next_run_at`` moved on without a scan, e.g. missed and ``skip``),
    ``duplicate`` (a scan for that fire time exists already) or ``lost`` (another
    replica moved the schedule first: nothing done here).
    """

    outcome: str
    scan_id: str | None = None
    previous_scan_id: str | None = None


class SchedulesMixin(StoreBase):
    """``scan_schedules`` and the scans it fires."""

    def db_time(self) -> datetime:
        """The database clock (the one ``created_at`` is written by), aware UTC."""
        with self._tx(single=True) as conn:
            value = conn.execute(select(self._now)).scalar_one()
        assert isinstance(value, datetime)
        return value

    def add_schedule(self, spec: ScheduleSpec) -> ScheduleRow:
        """Insert a schedule; ConflictError when the name exists."""
        next_run_at = spec.timing.next_after(self.db_time())
        try:
            with self._tx(single=True) as conn:
                row = conn.execute(
                    insert(scan_schedules)
                    .values(
                        name=spec.name,
                        cron=spec.timing.cron,
                        every_seconds=spec.timing.every_seconds,
                        tz=spec.timing.tz,
                        providers=list(spec.providers),
                        frameworks=list(spec.frameworks),
                        priority=spec.priority,
                        scan_key=spec.scan_key,
                        on_missed=spec.on_missed,
                        on_overlap=spec.on_overlap,
                        paused=False,
                        next_run_at=next_run_at,
                    )
                    .returning(*scan_schedules.c)
                ).one()
        except sa_exc.IntegrityError:
            raise ConflictError(f"a schedule named {spec.name!r} exists already") from None
        return ScheduleRow.from_mapping(row._mapping)

    def get_schedule(self, name: str) -> ScheduleRow:
        with self._tx(single=True) as conn:
            row = conn.execute(
                select(*scan_schedules.c).where(scan_schedules.c.name == name)
            ).first()
        if row is None:
            raise NotFoundError(f"no schedule named {name!r}")
        return ScheduleRow.from_mapping(row._mapping)

    def list_schedules(self) -> list[ScheduleRow]:
        with self._tx(single=True) as conn:
            rows = conn.execute(select(*scan_schedules.c).order_by(scan_schedules.c.name)).all()
        return [ScheduleRow.from_mapping(r._mapping) for r in rows]

    def remove_schedule(self, name: str) -> None:
        """Delete a schedule (its scans stay); NotFoundError when there is none."""
        with self._tx(single=True) as conn:
            removed = conn.execute(
                delete(scan_schedules).where(scan_schedules.c.name == name)
            ).rowcount
        if not removed:
            raise NotFoundError(f"no schedule named {name!r}")

    def pause_schedule(self, name: str) -> ScheduleRow:
        return self._set_paused(name, True, None)

    def resume_schedule(self, name: str) -> ScheduleRow:
        """Unpause; the next fire time is counted from now (a pause makes no catch-up)."""
        current = self.get_schedule(name)
        return self._set_paused(name, False, current.timing.next_after(self.db_time()))

    def _set_paused(self, name: str, paused: bool, next_run_at: datetime | None) -> ScheduleRow:
        values: dict[str, Any] = {"paused": paused}
        if next_run_at is not None:
            values["next_run_at"] = next_run_at
        with self._tx(single=True) as conn:
            row = conn.execute(
                update(scan_schedules)
                .where(scan_schedules.c.name == name)
                .values(**values)
                .returning(*scan_schedules.c)
            ).first()
        if row is None:
            raise NotFoundError(f"no schedule named {name!r}")
        return ScheduleRow.from_mapping(row._mapping)

    def due_schedules(self, now: datetime, limit: int = DUE_BATCH) -> list[ScheduleRow]:
        """Unpaused schedules whose ``next_run_at`` is at or before ``now``, earliest first.

        Raises :class:`SchedulesNotMigrated` while the schema has no ``scan_schedules``
        (a bridge of the new code running before the upgrade).
        """
        try:
            with self._tx(single=True) as conn:
                rows = conn.execute(
                    select(*scan_schedules.c)
                    .where(
                        scan_schedules.c.paused.is_(False),
                        scan_schedules.c.next_run_at <= now,
                    )
                    .order_by(scan_schedules.c.next_run_at, scan_schedules.c.name)
                    .limit(limit)
                ).all()
        except (sa_exc.ProgrammingError, sa_exc.OperationalError) as exc:
            text = str(getattr(exc, "orig", exc)).lower()
            if "scan_schedules" in text and ("no such table" in text or "does not exist" in text):
                raise SchedulesNotMigrated(
                    "no scan_schedules table yet: schedules fire once `scanqueue db upgrade` ran"
                ) from None
            raise
        return [ScheduleRow.from_mapping(r._mapping) for r in rows]

    def advance_schedule(
        self,
        schedule: ScheduleRow,
        next_run_at: datetime,
        fire_at: datetime | None,
    ) -> Advance:
        """Move ``schedule`` on from the ``next_run_at`` it was read with, and fire ``fire_at``.

        ``fire_at`` None: only move on.  With ``on_overlap == "skip"`` and the
        previous scan still queued or running, no scan is made (``overlap``).
        """
        expected = schedule.next_run_at
        with self._tx() as conn:
            cas = update(scan_schedules).where(
                scan_schedules.c.name == schedule.name,
                scan_schedules.c.paused.is_(False),
                (
                    scan_schedules.c.next_run_at.is_(None)
                    if expected is None
                    else scan_schedules.c.next_run_at == expected
                ),
            )
            won = conn.execute(cas.values(next_run_at=next_run_at)).rowcount == 1
            if not won:
                return Advance("lost")
            if fire_at is None:
                return Advance("advanced")
            previous = self._active_scan(conn, schedule.last_scan_id)
            if previous is not None and schedule.on_overlap == "skip":
                return Advance("overlap", previous_scan_id=previous)
            scan_id = self._insert_scheduled_scan(conn, schedule, fire_at)
            if scan_id is None:
                return Advance("duplicate")
            conn.execute(
                update(scan_schedules)
                .where(scan_schedules.c.name == schedule.name)
                .values(last_fired_at=self._now, last_scan_id=scan_id)
            )
        return Advance("fired", scan_id=scan_id)

    def run_schedule_now(self, name: str) -> tuple[ScheduleRow, str, datetime]:
        """Enqueue the schedule's scan now (also when paused).

        Returns the schedule, the scan's id and its ``scheduled_for`` (now, by the
        database clock).
        """
        with self._tx() as conn:
            row = conn.execute(
                select(*scan_schedules.c).where(scan_schedules.c.name == name)
            ).first()
            if row is None:
                raise NotFoundError(f"no schedule named {name!r}")
            schedule = ScheduleRow.from_mapping(row._mapping)
            now = conn.execute(select(self._now)).scalar_one()
            assert isinstance(now, datetime)
            scan_id = self._insert_scheduled_scan(conn, schedule, now)
            if scan_id is None:  # the same microsecond as another run-now: never here twice
                raise ConflictError(f"schedule {name!r} was run at this instant already")
            conn.execute(
                update(scan_schedules)
                .where(scan_schedules.c.name == name)
                .values(last_fired_at=now, last_scan_id=scan_id)
            )
        return schedule, scan_id, now

    def _active_scan(self, conn: Connection, scan_id: str | None) -> str | None:
        """``scan_id`` when that scan is still queued or running."""
        if scan_id is None:
            return None
        status = conn.execute(select(scans.c.status).where(scans.c.id == scan_id)).scalar()
        return scan_id if status in (STATUS_QUEUED, STATUS_RUNNING) else None

    def _insert_scheduled_scan(
        self, conn: Connection, schedule: ScheduleRow, fire_at: datetime
    ) -> str | None:
        """Insert the scan for (schedule, ``fire_at``); None when it exists already."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
        providers = [str(p) for p in schedule.providers]
        frameworks = [str(f) for f in schedule.frameworks]
        scan_id = new_scan_id()
        inserted = conn.execute(
            dialect_insert(scans)
            .values(
                id=scan_id,
                status=STATUS_QUEUED,
                providers_scanned=providers,
                frameworks_scanned=frameworks,
                priority=schedule.priority,
                scan_key=schedule.scan_key,
                effective_key=effective_key(schedule.scan_key, providers, frameworks),
                schedule_name=schedule.name,
                scheduled_for=fire_at,
            )
            .on_conflict_do_nothing()
            .returning(scans.c.id)
        ).first()
        return None if inserted is None else scan_id
