"""The console's session cookie (scanqueue.api.session): made under the token, expiring, narrow."""

from __future__ import annotations

from scanqueue.api.session import (
    COOKIE_NAME,
    cookie_from_header,
    make_session,
    session_cookie_header,
    session_valid,
)

TOKEN = b"the-api-token"


def test_a_session_is_valid_until_it_expires_and_only_under_its_token() -> None:
    value = make_session(TOKEN, now=1_000_000, ttl_s=60)
    assert value.startswith("1000060.") and TOKEN.decode() not in value
    assert session_valid(TOKEN, value, now=1_000_059)
    assert not session_valid(TOKEN, value, now=1_000_060)
    assert not session_valid(b"another-token", value, now=1_000_000)


def test_a_changed_expiry_or_a_malformed_value_is_refused() -> None:
    value = make_session(TOKEN, now=1_000_000, ttl_s=60)
    mac = value.split(".", 1)[1]
    assert not session_valid(TOKEN, f"9999999999.{mac}", now=1_000_000)
    for bad in ("", ".", "abc", "1000060", "1000060.", "-5.abc", "1" * 13 + "." + mac):
        assert not session_valid(TOKEN, bad, now=1_000_000), bad


def test_the_cookie_is_httponly_strict_and_scoped_to_the_api() -> None:
    header = session_cookie_header("v", 3600, secure=False)
    assert header == f"{COOKIE_NAME}=v; Max-Age=3600; Path=/api/; HttpOnly; SameSite=Strict"
    assert session_cookie_header("v", 3600, secure=True).endswith("; Secure")


def test_the_cookie_is_found_among_others() -> None:
    assert cookie_from_header(f"a=1; {COOKIE_NAME}=x.y ; b=2") == "x.y"
    assert cookie_from_header("a=1; b=2") is None
    assert cookie_from_header(f"{COOKIE_NAME}x=1") is None
