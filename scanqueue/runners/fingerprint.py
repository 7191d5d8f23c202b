"""A finding's fingerprint: what identifies it across the scans of one key
(docs/reference.md#findings-over-time).

Two sources, in this order:

1. **The scanner's own**, from a SARIF result's ``partialFingerprints`` or
   ``fingerprints`` (:func:`sarif_fingerprint`).  Scanners name them differently
   (CodeQL ``primaryLocationLineHash``, semgrep ``matchBasedId/v1``, …), so one
   is picked deterministically: the first of :data:`PREFERRED_KEYS` present,
   else the first key in sorted order; ``partialFingerprints`` before
   ``fingerprints``.  A value that is not an identifier — empty, longer than
   :data:`MAX_GIVEN_CHARS`, or holding whitespace, like semgrep's ``"requires
   login"`` placeholder that every result shares when it runs logged out — is
   ignored, so it can never make different findings one.
2. **Else a hash** of check id, resource, location and message.

Either way the stored value is ``sha256`` hex over the check id and resource
too (a scanner's line hash alone does not say which rule or file), so it is
stable across runs of the same scanner on the same input, and a finding keeps
its fingerprint when a scanner-given one survives a line moving.  Pure
functions: nothing here touches the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from scanqueue.runners.providers.base import Finding

# Well-known, stable keys (first match wins), before any other key in sorted order.
PREFERRED_KEYS = (
    "primaryLocationLineHash",  # CodeQL, GitHub code scanning
    "primaryLocationStartColumnFingerprint",
    "matchBasedId/v1",  # semgrep
    "stableId",
)
MAX_GIVEN_CHARS = 512
_SEP = "\x1f"  # unit separator: never part of an id, path or message boundary


def sarif_fingerprint(result: Mapping[str, Any]) -> str | None:
    """``"key=value"`` of the scanner-given fingerprint of a SARIF result, or None."""
    for member in ("partialFingerprints", "fingerprints"):
        given = result.get(member)
        if not isinstance(given, Mapping):
            continue
        usable = {k: v for k, v in given.items() if isinstance(k, str) and _usable(v)}
        if not usable:
            continue
        for key in PREFERRED_KEYS:
            if key in usable:
                return f"{key}={usable[key]}"
        key = sorted(usable)[0]
        return f"{key}={usable[key]}"
    return None


def _usable(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_GIVEN_CHARS
        and not any(c.isspace() for c in value)
    )


def finding_fingerprint(finding: Finding) -> str:
    """The fingerprint stored for ``finding`` (64 hex characters)."""
    parts: tuple[str, ...]
    if finding.fingerprint:
        parts = ("given", finding.check_id, finding.resource or "", finding.fingerprint)
    else:
        parts = fallback_parts(
            finding.check_id, finding.resource, finding.location, finding.message
        )
    return _digest(parts)


def fallback_parts(
    check_id: str, resource: str | None, location: str | None, message: str | None
) -> tuple[str, ...]:
    """What the hash covers when the scanner gave no fingerprint."""
    return ("hash", check_id, resource or "", location or "", message or "")


def fallback_fingerprint(
    check_id: str, resource: str | None, location: str | None, message: str | None
) -> str:
    """The hashed fingerprint of a stored finding (used to fill in rows stored without one)."""
    return _digest(fallback_parts(check_id, resource, location, message))


def _digest(parts: tuple[str, ...]) -> str:
    return hashlib.sha256(_SEP.join(parts).encode("utf-8", "surrogatepass")).hexdigest()
