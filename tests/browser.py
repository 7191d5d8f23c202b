"""Debian's Chromium for the browser tests, driven by Playwright (never a downloaded browser).

``scripts/test.sh`` installs it with apt-get when it is missing; without it a
browser test skips locally and fails in CI, like any missing service.
"""

from __future__ import annotations

import os
import shutil

from tests.conftest import service_missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The browser's path; skip (locally) or fail (CI) without it or without Playwright."""
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        service_missing("chromium (/usr/bin/chromium: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        service_missing("the playwright package (pip install -e '.[test]')")
    assert path is not None
    return path
