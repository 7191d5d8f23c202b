"""The one validator of a scan request, shared by ``scanqueue enqueue`` and the API.

Both entry points hand :func:`validate_scan_request` the same mapping
(``providers``, ``frameworks``, ``user``) and get back a :class:`ScanRequest`
or an :class:`InvalidScanRequest` listing every bad field, so a name the API
refuses is refused by the CLI too, for the same reason and in the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scanqueue.errors import ScanqueueError

MAX_NAME_CHARS = 200
MAX_LIST_ITEMS = 100
FIELDS = ("providers", "frameworks", "user")


class InvalidScanRequest(ScanqueueError):
    """A scan request with bad fields; ``details`` has one ``{field, message}`` per problem."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        self.details = details
        listed = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        super().__init__(f"invalid scan request: {listed}")


@dataclass(frozen=True)
class ScanRequest:
    """A validated request: names stripped, ``user`` None when blank."""

    providers: list[str]
    frameworks: list[str]
    user: str | None


def validate_scan_request(body: Any) -> ScanRequest:
    """Check ``body`` (a JSON object's worth) field by field; raise InvalidScanRequest."""
    if not isinstance(body, Mapping):
        raise InvalidScanRequest([{"field": "(body)", "message": "must be a JSON object"}])
    details: list[dict[str, str]] = []
    for name in sorted(str(k) for k in set(body) - set(FIELDS)):
        details.append({"field": name, "message": "unknown field"})
    providers = _names(body, "providers", details, required=True)
    frameworks = _names(body, "frameworks", details, required=False)
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_NAME_CHARS):
        details.append(
            {"field": "user", "message": f"must be a string of at most {MAX_NAME_CHARS} chars"}
        )
    elif isinstance(user, str) and not user.isprintable():
        details.append({"field": "user", "message": "must not hold control characters"})
    if details:
        raise InvalidScanRequest(details)
    return ScanRequest(providers, frameworks, (user.strip() or None) if user else None)


def _names(
    body: Mapping[str, Any], field: str, details: list[dict[str, str]], *, required: bool
) -> list[str]:
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
