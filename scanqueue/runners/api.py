"""The Runner API (docs/reference.md#runner-api): Job, ScanContext, ScanResult, Runner, and loading
one.

A runner is an object with ``run(job, ctx)``, a class with such a method
(built with no arguments), or a plain function ``f(job, ctx)`` (wrapped in
:class:`RunnerFunc`, like the old Go pool's).  ``ctx`` carries progress and
findings out (they become events) and the stop signal in (``ctx.cancelled`` /
``ctx.wait()``), set when the scan is canceled, its lease is lost or it timed out.
A runner that raises :class:`PermanentError` fails the scan at once; one that
raises :class:`RetryLater` asks for its retry after a delay (docs/reference.md#policies;
the retries themselves are :mod:`scanqueue.worker.retry`'s).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from scanqueue.errors import ConfigError, MalformedRowError

log = logging.getLogger(__name__)

STUB_SECONDS_DEFAULT = 0.05


@dataclass(frozen=True)
class Job:
    """One scan to run, as the runner sees it."""

    scan_id: str
    providers_scanned: list[str]
    frameworks_scanned: list[str]
    triggered_by_user: str | None = None
    triggered_by_token: str | None = field(default=None, repr=False)
    attempt: int = 1

    @classmethod
    def from_stored(
        cls,
        scan_id: str,
        providers_raw: Any,
        frameworks_raw: Any,
        *,
        triggered_by_user: str | None = None,
        triggered_by_token: str | None = None,
        attempt: int = 1,
    ) -> Job:
        """Build a job from stored column values; MalformedRowError names the bad column."""
        return cls(
            scan_id=scan_id,
            providers_scanned=_string_list("providers_scanned", providers_raw),
            frameworks_scanned=_string_list("frameworks_scanned", frameworks_raw),
            triggered_by_user=triggered_by_user,
            triggered_by_token=triggered_by_token,
            attempt=attempt,
        )


def _string_list(column: str, raw: Any) -> list[str]:
    value = raw
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            # PostgreSQL's jsonb hands a stored JSON string back decoded ("aws"), SQLite
            # the text as written: either way the column holds a string, not an array.
            raise MalformedRowError(
                f"{column}: expected a JSON array of strings, got a string {_preview(raw)}"
            ) from None
        except RecursionError:
            raise MalformedRowError(f"{column}: JSON nested too deeply") from None
    if not isinstance(value, list):
        raise MalformedRowError(
            f"{column}: expected a JSON array of strings, got {_json_kind(value)} {_preview(raw)}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise MalformedRowError(
                f"{column}: expected a JSON array of strings, got {_json_kind(item)} at "
                f"index {i} in {_preview(raw)}"
            )
    return list(value)


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words ("a string", "an object", …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _preview(raw: Any, limit: int = 80) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    return repr(text if len(text) <= limit else text[:limit] + "…")


# The longest delay RetryLater(after=...) may ask for: longer ones are cut to it,
# so a unit mistake (milliseconds) cannot park a scan for years.
MAX_RETRY_LATER_S = 30 * 24 * 3600.0


class PermanentError(Exception):
    """Raised by a runner: the scan fails now, with this text, and is not retried.

    For failures no retry can fix (bad credentials, an unknown account), when
    ``SCANQUEUE_MAX_RETRIES`` would otherwise retry every runner exception.
    """


class RetryLater(Exception):
    """Raised by a runner: run the scan again later (a throttled API, a busy target).

    ``after`` is the delay in seconds before the scan may start again (None: the
    usual exponential backoff).  It counts as a retry, bounded by
    ``SCANQUEUE_MAX_RETRIES`` like any runner failure: without retries left the
    scan ends ``failed`` with ``reason`` as its error.
    """

    def __init__(self, reason: str = "", *, after: float | None = None) -> None:
        if after is not None:
            if isinstance(after, bool) or not isinstance(after, int | float):
                raise TypeError(f"RetryLater(after=...) wants seconds, got {after!r}")
            if not math.isfinite(after) or after < 0:
                raise ValueError(f"RetryLater(after=...) wants seconds >= 0, got {after!r}")
            after = min(float(after), MAX_RETRY_LATER_S)
        super().__init__(reason)
        self.reason = reason
        self.after = after


@dataclass(frozen=True)
class ScanResult:
    """What a runner may return; ``findings_count`` lands in the scans row."""

    findings_count: int = 0


EventSink = Callable[[str, dict[str, Any]], None]


class ScanContext:
    """The runner's line to the outside: progress and findings out, stop signal in."""

    def __init__(
        self,
        scan_id: str,
        attempt: int = 1,
        emit: EventSink | None = None,
    ) -> None:
        self.scan_id = scan_id
        self.attempt = attempt
        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._emit = emit
        self.findings_reported = 0

    @property
    def cancelled(self) -> bool:
        """True once the scan was canceled, this run lost its lease, or it timed out."""
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True early (and then always) once told to stop."""
        return self._stop.wait(max(0.0, seconds))

    def progress(self, message: str | None = None, **fields: Any) -> None:
        """Report progress (percent, step, …); becomes a ``scan.progress`` event."""
        payload = dict(fields)
        if message is not None:
            payload["message"] = message
        self._send("scan.progress", payload)

    def finding(self, **finding: Any) -> None:
        """Report one finding; becomes a ``scan.finding`` event."""
        self.findings_reported += 1
        self._send("scan.finding", finding)

    def request_stop(self, reason: str) -> None:
        """Tell the runner to stop (the lease keeper: canceled, lease lost, timed out).

        The first reason sticks."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _send(self, event_type: str, payload: dict[str, Any]) -> None:
        if self._emit is None:
            return
        try:
            self._emit(event_type, payload)
        except Exception:  # a broken event sink never fails a scan
            log.exception("event %s for scan %s could not be recorded", event_type, self.scan_id)


@runtime_checkable
class Runner(Protocol):
    """Anything with ``run(job, ctx)`` returning None or a ScanResult."""

    def run(self, job: Job, ctx: ScanContext) -> ScanResult | None: ...


class RunnerFunc:
    """Adapts a plain function ``f(job, ctx)`` to the Runner protocol."""

    def __init__(self, func: Callable[[Job, ScanContext], ScanResult | None]) -> None:
        self.func = func

    def run(self, job: Job, ctx: ScanContext) -> ScanResult | None:
        return self.func(job, ctx)

    def __repr__(self) -> str:
        return f"RunnerFunc({getattr(self.func, '__qualname__', self.func)!r})"


class StubRunner:
    """The default runner: logs, sleeps briefly, completes with zero findings."""

    def __init__(self) -> None:
        raw = os.environ.get("SCANQUEUE_STUB_SECONDS", "")
        try:
            self.seconds = float(raw) if raw.strip() else STUB_SECONDS_DEFAULT
        except ValueError:
            raise ConfigError("SCANQUEUE_STUB_SECONDS", f"expected seconds, got {raw!r}") from None

    def run(self, job: Job, ctx: ScanContext) -> ScanResult:
        log.info(
            "stub runner: scan %s providers=%s frameworks=%s",
            job.scan_id,
            ",".join(job.providers_scanned),
            ",".join(job.frameworks_scanned),
        )
        ctx.wait(self.seconds)
        return ScanResult(findings_count=0)


def load_runner(path: str, variable: str = "SCANQUEUE_RUNNER") -> Runner:
    """Resolve ``module:attribute`` to a Runner; ConfigError with one clear line if it fails."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(variable, f"expected 'module:attribute', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            variable, f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(variable, f"module {module_name!r} has no {attr_path!r}") from None
    if isinstance(target, type):
        try:
            target = target()
        except Exception as exc:
            raise ConfigError(
                variable, f"cannot build {path} with no arguments: {type(exc).__name__}: {exc}"
            ) from None
    if callable(getattr(target, "run", None)):
        return target  # type: ignore[no-any-return]
    if callable(target):
        return RunnerFunc(target)
    raise ConfigError(variable, f"{path} is neither a runner (with run(job, ctx)) nor a function")
