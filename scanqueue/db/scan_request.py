"""The one validator of a scan request, shared by ``scanqueue enqueue``, the API and Python.

Every entry point hands :func:`validate_scan_request` the same mapping
(``providers``, ``frameworks``, ``user`` and the policy fields ``priority``,
``key``, ``run_after``, ``timeout_seconds``, ``labels``, ``unique``) and gets
back a :class:`ScanRequest` or an :class:`InvalidScanRequest` listing every bad
field, so a value the API refuses is refused by the CLI and by
``scanqueue.enqueue`` too, for the same reason and in the same words.

``run_after`` is ISO-8601; a time without an offset is taken as UTC.  Labels
are a small object of string → string (:data:`MAX_LABELS` entries, keys of
:data:`LABEL_KEY_PATTERN`, values of at most :data:`MAX_LABEL_VALUE_CHARS`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scanqueue.db.keys import MAX_KEY_CHARS, effective_key
from scanqueue.errors import ScanqueueError

MAX_NAME_CHARS = 200
MAX_LIST_ITEMS = 100
MAX_PRIORITY = 1_000_000  # priorities lie within ±this (as schedules' do)
MAX_TIMEOUT_S = 7 * 24 * 3600  # a run's timeout, at most one week (seconds)
MAX_LABELS = 16
MAX_LABEL_VALUE_CHARS = 200
# Label keys: letters, digits and ``_ . / -``, 1–63 chars (safe in a JSON path).
LABEL_KEY_PATTERN = re.compile(r"[A-Za-z0-9_./-]{1,63}")
FIELDS = (
    "providers",
    "frameworks",
    "user",
    "priority",
    "key",
    "run_after",
    "timeout_seconds",
    "labels",
    "unique",
)

Details = list[dict[str, str]]


class InvalidScanRequest(ScanqueueError):
    """A scan request with bad fields; ``details`` has one ``{field, message}`` per problem."""

    def __init__(self, details: Details) -> None:
        self.details = details
        listed = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        super().__init__(f"invalid scan request: {listed}")


@dataclass(frozen=True)
class ScanRequest:
    """A validated request: names stripped, ``user`` None when blank, ``run_after`` in UTC."""

    providers: list[str]
    frameworks: list[str]
    user: str | None
    priority: int = 0
    key: str | None = None
    run_after: datetime | None = None
    timeout_seconds: int | None = None
    labels: dict[str, str] | None = field(default=None)
    unique: bool = False

    @property
    def effective_key(self) -> str:
        """The key limits, dedup and pauses group this scan by."""
        return effective_key(self.key, self.providers, self.frameworks)


def validate_scan_request(body: Any) -> ScanRequest:
    """Check ``body`` (a JSON object's worth) field by field; raise InvalidScanRequest."""
    if not isinstance(body, Mapping):
        raise InvalidScanRequest([{"field": "(body)", "message": "must be a JSON object"}])
    details: Details = []
    for name in sorted(str(k) for k in set(body) - set(FIELDS)):
        details.append({"field": name, "message": "unknown field"})
    providers = _names(body, "providers", details, required=True)
    frameworks = _names(body, "frameworks", details, required=False)
    user = _text(body, "user", MAX_NAME_CHARS, details)
    key = _text(body, "key", MAX_KEY_CHARS, details)
    priority = _integer(body, "priority", -MAX_PRIORITY, MAX_PRIORITY, details)
    timeout = _integer(body, "timeout_seconds", 1, MAX_TIMEOUT_S, details)
    run_after = parse_run_after(body.get("run_after"), details)
    labels = _labels(body.get("labels"), details)
    unique = body.get("unique", False)
    if unique is None:
        unique = False
    if not isinstance(unique, bool):
        details.append({"field": "unique", "message": "must be true or false"})
    if details:
        raise InvalidScanRequest(details)
    return ScanRequest(
        providers,
        frameworks,
        user,
        priority=priority or 0,
        key=key,
        run_after=run_after,
        timeout_seconds=timeout,
        labels=labels,
        unique=bool(unique),
    )


def parse_run_after(value: Any, details: Details) -> datetime | None:
    """ISO-8601 text (or a datetime) → an aware UTC datetime; naive means UTC."""
    if value is None or value == "":
        return None
    parsed: datetime | None = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            parsed = None
    if parsed is None:
        details.append(
            {
                "field": "run_after",
                "message": "must be an ISO-8601 time such as 2026-12-06T17:00:00Z"
                " (without an offset: UTC)",
            }
        )
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_label_filter(items: Any, sep: str, details: Details, field_name: str) -> dict[str, str]:
    """``K<sep>V`` strings (``--label team=payments``, ``label=team:payments``) → a dict."""
    out: dict[str, str] = {}
    for item in items:
        k, found, v = str(item).partition(sep)
        if not found or not LABEL_KEY_PATTERN.fullmatch(k) or len(v) > MAX_LABEL_VALUE_CHARS:
            details.append(
                {
                    "field": field_name,
                    "message": f"expected KEY{sep}VALUE with KEY of letters, digits, _ . / -"
                    f" (at most 63), got {str(item)[:80]!r}",
                }
            )
            continue
        out[k] = v
    return out


def _text(body: Mapping[str, Any], name: str, limit: int, details: Details) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        details.append({"field": name, "message": f"must be a string of at most {limit} chars"})
        return None
    if not value.isprintable():
        details.append({"field": name, "message": "must not hold control characters"})
        return None
    return value.strip() or None


def _integer(
    body: Mapping[str, Any], name: str, low: int, high: int, details: Details
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        details.append({"field": name, "message": f"must be a whole number from {low} to {high}"})
        return None
    return value


def _labels(value: Any, details: Details) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        details.append({"field": "labels", "message": "must be an object of string → string"})
        return None
    if len(value) > MAX_LABELS:
        details.append({"field": "labels", "message": f"at most {MAX_LABELS} labels"})
        return None
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not LABEL_KEY_PATTERN.fullmatch(k):
            details.append(
                {
                    "field": f"labels[{str(k)[:80]!r}]",
                    "message": "key must be 1-63 letters, digits, _ . / -",
                }
            )
        elif not isinstance(v, str) or len(v) > MAX_LABEL_VALUE_CHARS or not v.isprintable():
            details.append(
                {
                    "field": f"labels[{k!r}]",
                    "message": f"value must be a printable string of at most"
                    f" {MAX_LABEL_VALUE_CHARS} chars",
                }
            )
        else:
            out[k] = v
    return out or None


def _names(body: Mapping[str, Any], field: str, details: Details, *, required: bool) -> list[str]:
    value = body.get(field)
    if value is None:
        if required:
            details.append({"field": field, "message": "required: a list of strings"})
        return []
    if not isinstance(value, list | tuple):
        details.append({"field": field, "message": "must be a list of strings"})
        return []
    if required and not value:
        details.append({"field": field, "message": "must name at least one"})
    if len(value) > MAX_LIST_ITEMS:
        details.append({"field": field, "message": f"at most {MAX_LIST_ITEMS} items"})
        return []
    out: list[str] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, str) or not item.strip():
            details.append({"field": where, "message": "must be a non-empty string"})
        elif len(item) > MAX_NAME_CHARS:
            details.append({"field": where, "message": f"at most {MAX_NAME_CHARS} characters"})
        elif not item.isprintable():
            details.append({"field": where, "message": "must not hold control characters"})
        else:
            out.append(item.strip())
    return out
