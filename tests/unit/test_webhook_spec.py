"""What a webhook definition may be, its delivery id, its signature and its backoff."""

from __future__ import annotations

import hashlib
import hmac
import json
import random

import pytest

from scanqueue.db.webhook_spec import (
    MAX_DELIVERY_ATTEMPTS,
    InvalidWebhook,
    build_payload,
    delivery_id_for,
    retry_delay_s,
    validate_webhook,
)
from scanqueue.dispatch.webhooks import sign


def test_signature_is_the_hex_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"scan_id":"a","status":"completed"}'
    assert sign("s3cret", body) == hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body + b" ") != sign("s3cret", body)


def test_delivery_id_is_one_per_receiver_and_scan() -> None:
    assert delivery_id_for(1, "a") == delivery_id_for(1, "a")
    assert len({delivery_id_for(1, "a"), delivery_id_for(2, "a"), delivery_id_for(1, "b")}) == 3


def test_retries_back_off_to_about_fifty_minutes_in_all() -> None:
    rng = random.Random(7)
    delays = [retry_delay_s(n, rng) for n in range(1, MAX_DELIVERY_ATTEMPTS)]
    assert 9 <= delays[0] <= 11 and all(d <= 990 for d in delays)
    assert delays == sorted(delays[:8]) + delays[8:]
    assert 2700 < sum(delays) < 3400


def test_payload_names_the_scan_and_never_the_token() -> None:
    scan = {
        "id": "a",
        "status": "failed",
        "error": "boom",
        "triggered_by_token": "tok",
        "findings_new": None,
        "providers_scanned": '["aws"]',
    }
    body = json.loads(build_payload(scan, "d1"))
    assert body["scan_id"] == "a" and body["type"] == "scan.failed"
    assert body["findings_new"] is None and body["providers"] == ["aws"]
    assert "tok" not in json.dumps(body)


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"url": "ftp://x/", "secret": "s"}, {"url"}),
        ({"url": "http://", "secret": "s"}, {"url"}),
        ({"url": "http://h/ x", "secret": "s"}, {"url"}),
        ({"url": "https://h/", "secret": ""}, {"secret"}),
        ({"url": "https://h/", "secret": "a\nb"}, {"secret"}),
        ({"url": "https://h/", "secret": "s", "events": []}, {"events"}),
        ({"url": "https://h/", "secret": "s", "events": "completed,done"}, {"events"}),
        ({"url": "https://h/", "secret": "s", "only_new_findings": "yes"}, {"only_new_findings"}),
        ({"url": "https://h/", "secret": "s", "extra": 1}, {"extra"}),
        ({}, {"url", "secret"}),
    ],
)
def test_bad_definitions_name_each_field(body: dict[str, object], fields: set[str]) -> None:
    with pytest.raises(InvalidWebhook) as caught:
        validate_webhook(body)
    assert {d["field"] for d in caught.value.details} == fields


def test_a_good_definition_keeps_the_statuses_in_order() -> None:
    spec = validate_webhook(
        {"url": "https://h/x", "secret": "s", "events": ["canceled", "completed"]}
    )
    assert spec.events == ("completed", "canceled") and not spec.only_new_findings
    assert "secret=" not in repr(spec)  # never in a log line by accident
