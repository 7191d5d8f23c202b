"""Firing schedules (docs/reference.md#schedules): the leader's run_once, called on its maintenance
tick.

There is no ``celery beat``: the leader bridge calls :func:`fire_due_once`
every maintenance tick (about once a second).  For each due schedule it
decides, from the schedule and the database clock, what to do:

* the **fire time** is the latest one at or before now (``L``); it is *on time*
  when seen within :meth:`Timing.grace_s` of it (the smaller of a minute and
  half the period), else it — and any before it — were *missed* (no leader ran);
* missed and ``on_missed=skip``: no scan; ``next_run_at`` jumps past now;
* otherwise one scan for ``L`` — after downtime that one scan is the catch-up
  for every missed fire time (``on_missed=once``);
* ``on_overlap=skip`` and the schedule's previous scan still queued or running:
  no scan, and a ``schedule.skipped`` event with the ``reason``.

The store makes it so in one transaction (:meth:`SchedulesMixin.advance_schedule`):
a compare-and-set on ``next_run_at`` lets one replica act per fire time, and
the UNIQUE (schedule_name, scheduled_for) index makes a second scan for one
fire time impossible — two leaders at once, or a failover mid-fire, still
make one.  Events go out only from the replica whose compare-and-set won, so
they too are sent once (at most: the sink may drop one, never the scan).

A schedule whose stored definition no longer parses (edited by hand, a zone
removed from the system) is paused with a warning and a ``schedule.skipped``
event, rather than failing every tick or blocking the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from scanqueue.db.rows import iso
from scanqueue.db.schedule_spec import InvalidSchedule, parse_timing
from scanqueue.db.schedules import ScheduleRow, SchedulesNotMigrated
from scanqueue.db.store import Store

log = logging.getLogger(__name__)

# (event type, scan id, payload): how firing reports, e.g. through emit_standalone.
EmitSchedule = Callable[[str, str, Mapping[str, Any]], object]
# While the schema predates schedules, say so this often (not every tick).
NOT_MIGRATED_WARN_EVERY_S = 300.0
_not_migrated_warned_at: float | None = None


@dataclass(frozen=True)
class Fired:
    """One schedule handled by one tick: ``outcome`` as in :class:`Advance`, or ``invalid``."""

    schedule: str
    outcome: str
    scheduled_for: datetime | None
    scan_id: str | None = None
    caught_up: bool = False


def fire_due_once(
    store: Store, now: datetime | None = None, emit: EmitSchedule | None = None
) -> list[Fired]:
    """Fire every due schedule once; ``now`` defaults to the database clock."""
    global _not_migrated_warned_at
    now = now if now is not None else store.db_time()
    try:
        due = store.due_schedules(now)
    except SchedulesNotMigrated as exc:
        last = _not_migrated_warned_at
        if last is None or time.monotonic() - last >= NOT_MIGRATED_WARN_EVERY_S:
            _not_migrated_warned_at = time.monotonic()
            log.warning("%s", exc)
        return []
    done: list[Fired] = []
    for schedule in due:
        try:
            done.append(_fire_one(store, schedule, now, emit))
        except InvalidSchedule as exc:
            log.warning(
                "schedule %s: %s; paused until it is removed and added again", schedule.name, exc
            )
            store.pause_schedule(schedule.name)
            _emit(emit, "schedule.skipped", "", schedule, None, {"reason": str(exc)})
            done.append(Fired(schedule.name, "invalid", None))
    return done


def _fire_one(
    store: Store, schedule: ScheduleRow, now: datetime, emit: EmitSchedule | None
) -> Fired:
    timing = parse_timing(schedule.cron, schedule.every_seconds, schedule.tz)
    due = schedule.next_run_at
    assert due is not None  # due_schedules selects only rows with a next_run_at
    latest = max(due, timing.latest_at_or_before(now))
    next_run_at = timing.next_after(max(latest, now))
    missed = (now - latest).total_seconds() > timing.grace_s(latest)
    caught_up = missed or latest > due  # fire times went by unfired
    if missed and schedule.on_missed == "skip":
        result = store.advance_schedule(schedule, next_run_at, None)
        if result.outcome == "advanced":
            log.info("schedule %s: missed fire times up to %s skipped", schedule.name, iso(latest))
            _emit(
                emit,
                "schedule.skipped",
                "",
                schedule,
                latest,
                {"reason": f"missed (no leader ran since {iso(due)}); on_missed=skip"},
            )
        return Fired(schedule.name, result.outcome, latest)
    result = store.advance_schedule(schedule, next_run_at, latest)
    if result.outcome == "fired":
        assert result.scan_id is not None
        extra: dict[str, Any] = {"catch_up": caught_up}
        if caught_up:
            extra["missed_since"] = iso(due)
        log.info(
            "schedule %s: fired scan %s for %s%s",
            schedule.name,
            result.scan_id,
            iso(latest),
            " (catch-up)" if caught_up else "",
        )
        _emit(emit, "schedule.fired", result.scan_id, schedule, latest, extra)
    elif result.outcome == "overlap":
        reason = f"previous scan {result.previous_scan_id} is still queued or running"
        log.info("schedule %s: skipped %s: %s", schedule.name, iso(latest), reason)
        _emit(
            emit,
            "schedule.skipped",
            "",
            schedule,
            latest,
            {"reason": reason, "previous_scan_id": result.previous_scan_id},
        )
    return Fired(schedule.name, result.outcome, latest, result.scan_id, caught_up)


def _emit(
    emit: EmitSchedule | None,
    event_type: str,
    scan_id: str,
    schedule: ScheduleRow,
    scheduled_for: datetime | None,
    extra: Mapping[str, Any],
) -> None:
    if emit is None:
        return
    payload = {"schedule": schedule.name, "scheduled_for": iso(scheduled_for), **extra}
    try:
        emit(event_type, scan_id, payload)
    except Exception as exc:  # an event is never worth a schedule
        log.warning("schedule %s: %s event dropped: %s", schedule.name, event_type, exc)
