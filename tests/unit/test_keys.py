"""The key a scan is grouped by."""

from __future__ import annotations

from scanqueue.db.keys import derive_key, effective_key


def test_the_derived_key_sorts_providers_and_frameworks() -> None:
    assert derive_key(["gcp", "aws"], ["soc2"]) == "aws,gcp|soc2"
    assert derive_key(["aws"], []) == "aws|"
    assert derive_key(["aws"], ["soc2", "iso27001"]) == "aws|iso27001,soc2"


def test_a_scan_key_wins_unless_blank() -> None:
    assert effective_key("acct-42", ["aws"], ["soc2"]) == "acct-42"
    assert effective_key("  ", ["aws"], ["soc2"]) == "aws|soc2"
    assert effective_key(None, ["b", "a"], []) == "a,b|"
