"""What a webhook is (docs/reference.md#webhooks): its definition, what a receiver gets,
the retry schedule.

Owns :func:`validate_webhook` (shared by ``scanqueue webhooks add`` and
``POST /api/v1/webhooks``, so both refuse the same definitions in the same
words), the records rows become (:class:`WebhookRow` — never the secret —
and :class:`DueDelivery`), the delivery id (:func:`delivery_id_for`: one per
(receiver, scan), stable), the JSON body (:func:`build_payload`: never the
token) and the backoff (:func:`retry_delay_s`).  No statements run here; they
are in :mod:`scanqueue.db.webhooks`.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from scanqueue.config import mask_url
from scanqueue.db.rows import decode_json, iso
from scanqueue.db.schema import FINISHED_STATUSES
from scanqueue.errors import ScanqueueError

MAX_URL_CHARS = 2000
MAX_SECRET_CHARS = 1000
DEFAULT_EVENTS = FINISHED_STATUSES  # completed, failed, canceled
# Retries: attempt n (1-based) failed → the next after min(BASE·2^(n-1), MAX) seconds,
# ±10 % jitter; after MAX_DELIVERY_ATTEMPTS tries the row is given up.  10 tries span
# 10+20+40+80+160+320+640+900+900 s ≈ 51 minutes.
MAX_DELIVERY_ATTEMPTS = 10
RETRY_BASE_S = 10.0
RETRY_MAX_S = 900.0
RETRY_JITTER = 0.1
CLAIM_S = 60.0  # a claimed row is the claimer's for this long (well over the HTTP timeout)
FANOUT_BATCH = 200  # finished scans put into the outbox per call, at most
MAX_ERROR_CHARS = 500
# uuid5 namespace of delivery ids: one id per (receiver, scan), whoever computes it.
DELIVERY_NAMESPACE = uuid.UUID("6f1d3c1e-4b7a-5d1e-9a43-0c2f8e5b7a10")


class InvalidWebhook(ScanqueueError):
    """A webhook definition that cannot be used; ``details`` name the fields."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        self.details = details
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details))


@dataclass(frozen=True)
class WebhookSpec:
    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] = DEFAULT_EVENTS
    only_new_findings: bool = False


def parse_events(raw: Any) -> tuple[str, ...]:
    """``"completed,failed"`` or ``["completed", "failed"]`` → the statuses, in order.

    Raises ValueError naming what is wrong.
    """
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, list | tuple) and all(isinstance(p, str) for p in raw):
        items = [p.strip() for p in raw]
    else:
        raise ValueError("expected a list of statuses, or a comma-separated string")
    items = [p for p in items if p]
    if not items:
        raise ValueError(f"name at least one of {', '.join(DEFAULT_EVENTS)}")
    unknown = [p for p in items if p not in DEFAULT_EVENTS]
    if unknown:
        raise ValueError(
            f"unknown status {unknown[0]!r}: expected some of {', '.join(DEFAULT_EVENTS)}"
        )
    return tuple(s for s in DEFAULT_EVENTS if s in items)


def _url_problem(url: Any) -> str | None:
    if not isinstance(url, str) or not url.strip():
        return "required: an http:// or https:// URL"
    if len(url) > MAX_URL_CHARS:
        return f"at most {MAX_URL_CHARS} characters"
    if any(not c.isprintable() or c.isspace() for c in url):
        return "no spaces or control characters"
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return "malformed URL"
    if parts.scheme.lower() not in ("http", "https"):
        return "only http:// and https:// URLs are accepted"
    if not parts.hostname:
        return "the URL names no host"
    return None


def validate_webhook(body: Any) -> WebhookSpec:
    """A webhook from a JSON object (the API's body, the CLI's options); InvalidWebhook if bad.

    Fields: ``url`` (http or https), ``secret`` (1–1000 characters, no control
    characters), optional ``events`` (list or comma-separated; default all three
    finished statuses) and ``only_new_findings`` (boolean).
    """
    if not isinstance(body, Mapping):
        raise InvalidWebhook([{"field": "body", "message": "expected a JSON object"}])
    details: list[dict[str, str]] = []
    unknown = sorted(set(body) - {"url", "secret", "events", "only_new_findings"})
    for name in unknown:
        details.append({"field": str(name), "message": "unknown field"})
    url = body.get("url")
    problem = _url_problem(url)
    if problem:
        details.append({"field": "url", "message": problem})
    secret = body.get("secret")
    if not isinstance(secret, str) or not secret:
        details.append({"field": "secret", "message": "required: a non-empty string"})
    elif len(secret) > MAX_SECRET_CHARS:
        details.append({"field": "secret", "message": f"at most {MAX_SECRET_CHARS} characters"})
    elif any(not c.isprintable() for c in secret):
        details.append({"field": "secret", "message": "no control characters"})
    events: tuple[str, ...] = DEFAULT_EVENTS
    if body.get("events") is not None:
        try:
            events = parse_events(body["events"])
        except ValueError as exc:
            details.append({"field": "events", "message": str(exc)})
    only_new = body.get("only_new_findings", False)
    if only_new is None:
        only_new = False
    if not isinstance(only_new, bool):
        details.append({"field": "only_new_findings", "message": "expected true or false"})
    if details:
        raise InvalidWebhook(details)
    assert isinstance(url, str) and isinstance(secret, str)
    return WebhookSpec(url.strip(), secret, events, bool(only_new))


@dataclass(frozen=True)
class WebhookRow:
    """A webhook as users see it: never its secret; the URL's password masked."""

    id: int
    url: str
    events: tuple[str, ...]
    only_new_findings: bool
    created_at: datetime | None
    pending: int = 0
    delivered: int = 0
    given_up: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": mask_url(self.url),
            "events": list(self.events),
            "only_new_findings": self.only_new_findings,
            "created_at": iso(self.created_at),
            "deliveries": {
                "pending": self.pending,
                "delivered": self.delivered,
                "given_up": self.given_up,
            },
        }


@dataclass(frozen=True)
class DueDelivery:
    """An outbox row claimed for sending (attempts already counts this try)."""

    id: int
    delivery_id: str
    webhook_id: int
    scan_id: str
    url: str
    secret: str = field(repr=False)
    payload: str = field(repr=False)
    attempts: int = 1


def delivery_id_for(webhook_id: int, scan_id: str) -> str:
    """The ``X-Scanqueue-Delivery`` value: one per (receiver, scan), stable."""
    return str(uuid.uuid5(DELIVERY_NAMESPACE, f"{webhook_id}/{scan_id}"))


def build_payload(scan: Mapping[Any, Any], delivery_id: str) -> str:
    """The JSON body POSTed for a finished scan (never the token: it is not read)."""
    status = scan["status"]
    return json.dumps(
        {
            "type": f"scan.{status}",
            "delivery_id": delivery_id,
            "scan_id": scan["id"],
            "status": status,
            "key": scan.get("effective_key"),
            "findings_count": scan.get("findings_count") or 0,
            "findings_new": scan.get("findings_new"),
            "findings_fixed": scan.get("findings_fixed"),
            "baseline_id": scan.get("baseline_id"),
            "error": scan.get("error"),
            "providers": decode_json(scan.get("providers_scanned")),
            "frameworks": decode_json(scan.get("frameworks_scanned")),
            "triggered_by_user": scan.get("triggered_by_user"),
            "created_at": iso(scan.get("created_at")),
            "started_at": iso(scan.get("started_at")),
            "finished_at": iso(scan.get("finished_at")),
        },
        separators=(",", ":"),
        default=str,
    )


def retry_delay_s(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before the next try after ``attempts`` failed ones (jittered)."""
    base = min(RETRY_BASE_S * 2 ** max(0, attempts - 1), RETRY_MAX_S)
    jitter: float = (rng or random).uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    return float(base * jitter)
