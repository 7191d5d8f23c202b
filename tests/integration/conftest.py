"""Fixtures shared by the API tests: settings on a test database, a migrated URL and an
in-process client of the app (a loopback Host: without a token, writes from any other
name answer 403)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from scanqueue.api.app import create_app
from scanqueue.config import Settings, normalize_database_url
from tests.conftest import upgrade


def api_settings(db_url: str, **env: str) -> Settings:
    """Settings for ``db_url`` with a queue of their own, plus ``env``."""
    return Settings.from_env(
        {"DATABASE_URL": db_url, "SCANQUEUE_QUEUE": f"q{time.monotonic_ns()}", **env}
    )


@pytest.fixture
def migrated(db_url: str) -> str:
    upgrade(db_url)
    return normalize_database_url(db_url)


@pytest.fixture
def client(migrated: str) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(migrated)), base_url="http://127.0.0.1") as c:
        yield c
