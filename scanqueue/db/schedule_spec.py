"""A schedule's definition (docs/reference.md#schedules): the one validator, and the times it fires
at.

``scanqueue schedules add`` and ``POST /api/v1/schedules`` both hand
:func:`validate_schedule` the same mapping and get back a :class:`ScheduleSpec`
or an :class:`InvalidSchedule` naming every bad field, so both refuse the same
definitions in the same words (providers and frameworks by the rules of
:mod:`scanqueue.db.scan_request`).

**Times.** A schedule fires either on a five-field cron expression read in an
IANA zone (``tz``, default UTC), or every ``every_seconds`` — on the multiples
of that period since the Unix epoch, so ``--every 3600`` fires on the hour
(UTC) and every replica computes the same fire times.  All times leave this
module as aware UTC datetimes.

**Why cronsim.** Cron maths uses `cronsim <https://pypi.org/project/cronsim/>`_
(the evaluator behind Healthchecks.io's cron checks): small, pure Python,
typed, maintained, iterates forwards and backwards from an aware datetime in
any ``zoneinfo`` zone, and handles daylight saving the way Debian's cron does
— a fire time inside the skipped spring-forward hour runs once, right after the
jump; a fixed time inside the repeated autumn hour runs once, not twice; an
hourly job runs once per real hour.  ``croniter`` has had long stretches
without a maintainer and its DST handling has open reports; Celery's
``crontab`` is built to answer "is it due?" for beat, not "what is the next
fire time in this zone?".  cronsim also accepts a sixth (seconds) field and
``@`` aliases; the contract says five fields, so this module checks that first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from scanqueue.db.scan_request import (
    MAX_NAME_CHARS,
    InvalidScanRequest,
    validate_scan_request,
)
from scanqueue.errors import ScanqueueError

ON_MISSED = ("once", "skip")
ON_OVERLAP = ("skip", "queue")
DEFAULT_TZ = "UTC"
MAX_EVERY_SECONDS = 366 * 86_400  # a year and a day
MAX_CRON_CHARS = 200
MAX_TZ_CHARS = 64
MAX_PRIORITY = 1_000_000
# A fire time the leader sees later than this (or half the schedule's period, if
# shorter) was missed — the leader was down — rather than merely seen on the next
# tick.  A failover (at most 30 s) therefore never counts as downtime for a
# schedule whose period is over a minute.
MISSED_GRACE_S = 60.0
FIELDS = (
    "name",
    "cron",
    "every_seconds",
    "tz",
    "providers",
    "frameworks",
    "priority",
    "key",
    "on_missed",
    "on_overlap",
)


class InvalidSchedule(ScanqueueError):
    """A schedule definition with bad fields; ``details`` has one ``{field, message}`` each."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        self.details = details
        listed = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        super().__init__(f"invalid schedule: {listed}")


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: ``cron`` in ``tz``, or every ``every_seconds``."""

    cron: str | None
    every_seconds: int | None
    tz: str = DEFAULT_TZ

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def next_after(self, t: datetime) -> datetime:
        """The first fire time strictly after ``t`` (aware UTC)."""
        if self.every_seconds is not None:
            n = self.every_seconds
            seconds = int(t.timestamp() // n) * n + n
            return datetime.fromtimestamp(seconds, UTC)
        assert self.cron is not None
        return next(CronSim(self.cron, t.astimezone(self.zone))).astimezone(UTC)

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last fire time at or before ``t`` (aware UTC)."""
        if self.every_seconds is not None:
            n = self.every_seconds
            return datetime.fromtimestamp(int(t.timestamp() // n) * n, UTC)
        assert self.cron is not None
        after = (t + timedelta(microseconds=1)).astimezone(self.zone)
        return next(CronSim(self.cron, after, reverse=True)).astimezone(UTC)

    def grace_s(self, fire_time: datetime) -> float:
        """How late ``fire_time`` may be seen and still count as on time."""
        period = (self.next_after(fire_time) - fire_time).total_seconds()
        return min(MISSED_GRACE_S, period / 2)


@dataclass(frozen=True)
class ScheduleSpec:
    """A validated definition, ready to store."""

    name: str
    timing: Timing
    providers: list[str]
    frameworks: list[str]
    priority: int = 0
    scan_key: str | None = None
    on_missed: str = "once"
    on_overlap: str = "skip"


def parse_timing(cron: Any, every_seconds: Any, tz: Any) -> Timing:
    """Check one timing; raise :class:`InvalidSchedule` naming the bad field."""
    details: list[dict[str, str]] = []
    timing = _timing(cron, every_seconds, tz, details)
    if details or timing is None:
        raise InvalidSchedule(details)
    return timing


def validate_schedule(body: Any) -> ScheduleSpec:
    """Check a definition (a JSON object's worth) field by field."""
    if not isinstance(body, Mapping):
        raise InvalidSchedule([{"field": "(body)", "message": "must be a JSON object"}])
    details: list[dict[str, str]] = []
    for unknown in sorted(str(k) for k in set(body) - set(FIELDS)):
        details.append({"field": unknown, "message": "unknown field"})
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        details.append({"field": "name", "message": "required: a non-empty string"})
    elif len(name) > MAX_NAME_CHARS or not name.isprintable() or "/" in name:
        details.append(
            {
                "field": "name",
                "message": f"at most {MAX_NAME_CHARS} printable characters, no '/'",
            }
        )
    timing = _timing(body.get("cron"), body.get("every_seconds"), body.get("tz"), details)
    try:
        scan = validate_scan_request(
            {"providers": body.get("providers"), "frameworks": body.get("frameworks")}
        )
    except InvalidScanRequest as exc:
        details.extend(exc.details)
        scan = None
    priority = body.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
        details.append(
            {"field": "priority", "message": f"must be an integer within ±{MAX_PRIORITY}"}
        )
    key = body.get("key")
    if key is not None and (
        not isinstance(key, str) or len(key) > MAX_NAME_CHARS or not key.isprintable()
    ):
        details.append(
            {"field": "key", "message": f"must be a string of at most {MAX_NAME_CHARS} chars"}
        )
    on_missed = _choice(body, "on_missed", ON_MISSED, details)
    on_overlap = _choice(body, "on_overlap", ON_OVERLAP, details)
    if details or timing is None or scan is None:
        raise InvalidSchedule(details)
    assert isinstance(name, str) and isinstance(priority, int)
    return ScheduleSpec(
        name=name.strip(),
        timing=timing,
        providers=scan.providers,
        frameworks=scan.frameworks,
        priority=priority,
        scan_key=key.strip() if isinstance(key, str) and key.strip() else None,
        on_missed=on_missed,
        on_overlap=on_overlap,
    )


def _timing(cron: Any, every: Any, tz: Any, details: list[dict[str, str]]) -> Timing | None:
    start = len(details)
    if tz is None:
        tz = DEFAULT_TZ
    if not isinstance(tz, str) or not tz or len(tz) > MAX_TZ_CHARS:
        details.append({"field": "tz", "message": "must be an IANA time zone name"})
    else:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            details.append({"field": "tz", "message": f"unknown time zone {tz!r}"})
    if (cron is None) == (every is None):
        details.append({"field": "cron", "message": "give exactly one of cron or every_seconds"})
    elif cron is not None:
        _check_cron(cron, details)
    elif (
        isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= MAX_EVERY_SECONDS
    ):
        details.append(
            {
                "field": "every_seconds",
                "message": f"must be a whole number of seconds from 1 to {MAX_EVERY_SECONDS}",
            }
        )
    if len(details) > start:
        return None
    return Timing(cron.strip() if isinstance(cron, str) else None, every, tz)


def _check_cron(cron: Any, details: list[dict[str, str]]) -> None:
    if not isinstance(cron, str) or len(cron) > MAX_CRON_CHARS:
        details.append({"field": "cron", "message": "must be a five-field cron expression"})
        return
    fields = cron.split()
    if len(fields) != 5:
        details.append(
            {
                "field": "cron",
                "message": f"{cron!r} has {len(fields)} fields; want five"
                " (minute hour day-of-month month day-of-week)",
            }
        )
        return
    try:
        next(CronSim(cron, datetime.now(UTC)))
    except CronSimError as exc:
        details.append({"field": "cron", "message": f"bad cron expression {cron!r}: {exc}"})
    except StopIteration:
        details.append({"field": "cron", "message": f"cron expression {cron!r} never fires"})


def _choice(
    body: Mapping[str, Any], field: str, choices: tuple[str, ...], details: list[dict[str, str]]
) -> str:
    value = body.get(field)
    if value is None:
        return choices[0]
    if value not in choices:
        details.append({"field": field, "message": f"must be one of {', '.join(choices)}"})
        return choices[0]
    return str(value)
