"""Retries of runner failures: the backoff maths and the decision (docs/reference.md#policies)."""

from __future__ import annotations

import math
import random

import pytest

import scanqueue
from scanqueue.config import Settings
from scanqueue.errors import ConfigError
from scanqueue.runners.api import MAX_RETRY_LATER_S
from scanqueue.worker.retry import MAX_BACKOFF_S, backoff_s, decide


def lowest(a: float, b: float) -> float:
    return a


def highest(a: float, b: float) -> float:
    return b


def test_backoff_doubles_from_the_base_with_jitter_in_the_upper_half() -> None:
    for retries, ceiling in enumerate([10, 20, 40, 80, 160]):
        assert backoff_s(retries, 10, uniform=highest) == ceiling
        assert backoff_s(retries, 10, uniform=lowest) == ceiling / 2
    rng = random.Random(7)
    draws = [backoff_s(2, 10, uniform=rng.uniform) for _ in range(200)]
    assert all(20 <= d <= 40 for d in draws)
    assert len({round(d, 6) for d in draws}) > 150  # jittered, not one value


def test_backoff_is_capped_at_an_hour_however_many_retries() -> None:
    assert MAX_BACKOFF_S == 3600
    assert backoff_s(9, 10, uniform=highest) == 3600  # 10 × 512 > 3600
    assert backoff_s(10_000, 10, uniform=highest) == 3600  # no overflow
    assert backoff_s(10_000, 10, uniform=lowest) == 1800
    assert backoff_s(3, 0, uniform=highest) == 0  # base 0: retry at once


def test_decide_retries_while_retries_are_left_and_never_a_permanent_error() -> None:
    boom = RuntimeError("throttled")
    assert decide(boom, retries=0, max_retries=2, base_s=10, uniform=highest).delay_s == 10
    assert decide(boom, retries=1, max_retries=2, base_s=10, uniform=highest).delay_s == 20
    assert not decide(boom, retries=2, max_retries=2, base_s=10).retry
    assert not decide(boom, retries=0, max_retries=0, base_s=10).retry  # the default
    permanent = scanqueue.PermanentError("bad credentials")
    assert not decide(permanent, retries=0, max_retries=5, base_s=10).retry
    # A timeout (no exception) is retried like any failure.
    assert decide(None, retries=0, max_retries=1, base_s=4, uniform=highest).delay_s == 4


def test_retry_later_asks_for_its_delay_within_the_same_budget() -> None:
    later = scanqueue.RetryLater("rate limited", after=90)
    assert str(later) == "rate limited" and later.after == 90
    assert decide(later, retries=3, max_retries=5, base_s=10).delay_s == 90
    assert decide(later, retries=0, max_retries=1, base_s=10).delay_s == 90  # no backoff cap
    assert not decide(later, retries=1, max_retries=1, base_s=10).retry
    plain = scanqueue.RetryLater("busy")  # no after: the usual backoff
    assert decide(plain, retries=1, max_retries=5, base_s=10, uniform=highest).delay_s == 20
    assert scanqueue.RetryLater("x", after=1e12).after == MAX_RETRY_LATER_S


@pytest.mark.parametrize("after", [-1, math.inf, math.nan])
def test_retry_later_rejects_a_delay_that_is_not_seconds(after: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        scanqueue.RetryLater("x", after=after)
    with pytest.raises(TypeError):
        scanqueue.RetryLater("x", after="5")  # type: ignore[arg-type]


def test_the_exceptions_are_exported_from_the_package() -> None:
    assert {"RetryLater", "PermanentError"} <= set(scanqueue.__all__)
    assert issubclass(scanqueue.RetryLater, Exception)
    assert issubclass(scanqueue.PermanentError, Exception)


def test_settings_read_retries_backoff_and_timeout() -> None:
    s = Settings.from_env({})
    assert (s.max_retries, s.retry_backoff_s, s.scan_timeout_s) == (0, 10.0, 0.0)
    s = Settings.from_env(
        {
            "SCANQUEUE_MAX_RETRIES": "3",
            "SCANQUEUE_RETRY_BACKOFF": "2.5",
            "SCANQUEUE_SCAN_TIMEOUT": "600",
        }
    )
    assert (s.max_retries, s.retry_backoff_s, s.scan_timeout_s) == (3, 2.5, 600.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SCANQUEUE_MAX_RETRIES", "-1"),
        ("SCANQUEUE_MAX_RETRIES", "lots"),
        ("SCANQUEUE_RETRY_BACKOFF", "-5"),
        ("SCANQUEUE_SCAN_TIMEOUT", "soon"),
    ],
)
def test_bad_policy_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({variable: value})
    assert str(err.value).startswith(f"{variable}: ") and "\n" not in str(err.value)
