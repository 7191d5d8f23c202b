"""Schedule times (docs/reference.md#schedules): five-field cron in a real zone, across both DST changes.

Europe/Berlin moves from 02:00 CET to 03:00 CEST on 2026-03-29 (02:00–03:00 does
not exist) and back from 03:00 CEST to 02:00 CET on 2026-10-25 (02:00–03:00
happens twice).  Neither may skip nor double a run.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from scanqueue.db.schedule_spec import (
    MISSED_GRACE_S,
    InvalidSchedule,
    Timing,
    parse_timing,
    validate_schedule,
)

BERLIN = ZoneInfo("Europe/Berlin")


def _fires(timing: Timing, start: datetime, end: datetime) -> list[datetime]:
    out: list[datetime] = []
    t = start
    for _ in range(10_000):
        t = timing.next_after(t)
        if t >= end:
            return out
        out.append(t)
    raise AssertionError("too many fire times")


def _local(day: str, hm: str) -> datetime:
    return datetime.fromisoformat(f"{day}T{hm}").replace(tzinfo=BERLIN)


@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25"])
def test_a_daily_0230_job_fires_exactly_once_on_a_dst_day(day: str) -> None:
    timing = Timing("30 2 * * *", None, "Europe/Berlin")
    start = _local(day, "00:00").astimezone(UTC)
    fires = _fires(timing, start, start + timedelta(hours=24))
    assert len(fires) == 1
    local = fires[0].astimezone(BERLIN)
    if day == "2026-03-29":  # 02:30 does not exist: right after the jump, once
        assert (local.hour, local.minute) == (3, 0)
        assert fires[0] == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    else:  # 02:30 happens twice: the first one only
        assert (local.hour, local.minute) == (2, 30)
        assert fires[0] == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def test_a_daily_job_fires_every_day_across_both_changes() -> None:
    timing = Timing("30 2 * * *", None, "Europe/Berlin")
    start = datetime(2026, 3, 1, tzinfo=UTC)
    fires = _fires(timing, start, datetime(2026, 11, 30, tzinfo=UTC))
    days = [f.astimezone(BERLIN).date() for f in fires]
    assert len(days) == len(set(days)) == (days[-1] - days[0]).days + 1


def test_an_hourly_job_runs_once_per_real_hour_on_both_changes() -> None:
    timing = Timing("0 * * * *", None, "Europe/Berlin")
    spring = _fires(
        timing, _local("2026-03-29", "00:00") - timedelta(seconds=1), _local("2026-03-30", "00:00")
    )
    autumn = _fires(
        timing, _local("2026-10-25", "00:00") - timedelta(seconds=1), _local("2026-10-26", "00:00")
    )
    assert len(spring) == 23  # the day has 23 hours
    assert len(autumn) == 25  # and this one 25: 02:00 CEST and 02:00 CET are both real
    for fires in (spring, autumn):
        assert len(set(fires)) == len(fires)
        gaps = {b - a for a, b in itertools.pairwise(fires)}
        assert gaps == {timedelta(hours=1)}


def test_latest_at_or_before_is_the_inverse_of_next_after() -> None:
    timing = Timing("30 2 * * *", None, "Europe/Berlin")
    fire = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert timing.latest_at_or_before(fire) == fire
    assert timing.latest_at_or_before(fire + timedelta(hours=5)) == fire
    assert timing.next_after(fire - timedelta(microseconds=1)) == fire
    assert timing.next_after(fire) > fire


def test_every_seconds_fires_on_multiples_of_the_period_since_the_epoch() -> None:
    hourly = Timing(None, 3600, "UTC")
    t = datetime(2026, 12, 6, 15, 59, 59, 999_000, tzinfo=UTC)
    assert hourly.next_after(t) == datetime(2026, 12, 6, 16, 0, tzinfo=UTC)
    assert hourly.next_after(datetime(2026, 12, 6, 16, 0, tzinfo=UTC)) == datetime(
        2026, 12, 6, 17, 0, tzinfo=UTC
    )
    assert hourly.latest_at_or_before(t) == datetime(2026, 12, 6, 15, 0, tzinfo=UTC)
    on_grid = datetime(2026, 12, 6, 16, 0, tzinfo=UTC)
    assert Timing(None, 2, "UTC").grace_s(on_grid) == 1.0  # half the period
    assert hourly.grace_s(on_grid) == MISSED_GRACE_S


@pytest.mark.parametrize(
    ("cron", "every", "tz", "field"),
    [
        ("61 * * * *", None, "UTC", "cron"),
        ("* * * *", None, "UTC", "cron"),
        ("0 0 * * * *", None, "UTC", "cron"),  # six fields: seconds are not five-field cron
        ("@daily", None, "UTC", "cron"),
        ("0 0 31 2 *", None, "UTC", "cron"),
        ("0 3 * * *", None, "Mars/Olympus", "tz"),
        ("0 3 * * *", None, "../../etc/passwd", "tz"),
        (None, 0, "UTC", "every_seconds"),
        (None, True, "UTC", "every_seconds"),
        ("0 3 * * *", 60, "UTC", "cron"),
        (None, None, "UTC", "cron"),
    ],
)
def test_bad_timings_name_their_field(cron: object, every: object, tz: object, field: str) -> None:
    with pytest.raises(InvalidSchedule) as info:
        parse_timing(cron, every, tz)
    assert info.value.details[0]["field"] == field
    assert "\n" not in str(info.value)


def test_a_definition_is_validated_like_a_scan_request() -> None:
    spec = validate_schedule(
        {"name": " nightly ", "cron": "0 3 * * *", "tz": "Europe/Berlin", "providers": ["aws"]}
    )
    assert (spec.name, spec.on_missed, spec.on_overlap, spec.priority) == (
        "nightly",
        "once",
        "skip",
        0,
    )
    with pytest.raises(InvalidSchedule) as info:
        validate_schedule(
            {"name": "x", "every_seconds": 60, "providers": [], "on_overlap": "later", "nope": 1}
        )
    fields = {d["field"] for d in info.value.details}
    assert fields == {"nope", "providers", "on_overlap"}


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 * * * *", "*/20 1-3 * * *"])
@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25"])
def test_backwards_and_forwards_agree_across_a_dst_day(expr: str, day: str) -> None:
    """The leader finds the latest missed fire time backwards: the same times as forwards."""
    timing = Timing(expr, None, "Europe/Berlin")
    start = _local(day, "00:00").astimezone(UTC) - timedelta(hours=2)
    fires = _fires(timing, start, start + timedelta(hours=30))
    for fire in fires:
        assert timing.latest_at_or_before(fire) == fire
        assert timing.latest_at_or_before(fire + timedelta(seconds=59)) == fire
