"""Every name the docs give users still resolves where the docs say it is."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import scanqueue


def test_the_runner_api_imports_from_the_package_root() -> None:
    from scanqueue import Job, Runner, RunnerFunc, ScanContext, ScanResult, ScanRunner, StubRunner

    assert {"Job", "Runner", "ScanContext", "ScanResult", "ScanRunner"} <= set(scanqueue.__all__)
    assert all(
        callable(name)
        for name in (Job, RunnerFunc, ScanContext, ScanResult, ScanRunner, StubRunner)
    )
    assert hasattr(Runner, "run")


def test_runner_paths_in_the_docs_load() -> None:
    from scanqueue.config import DEFAULT_RUNNER
    from scanqueue.runners.api import StubRunner, load_runner

    assert isinstance(load_runner(DEFAULT_RUNNER), StubRunner)
    assert load_runner("scanqueue:ScanRunner").run


def test_the_provider_kind_entry_point_loads() -> None:
    kinds = {
        ep.name: ep for ep in importlib.metadata.entry_points(group="scanqueue.provider_kinds")
    }
    assert kinds["sarif-command"].load().__name__ == "SarifCommandProvider"


def test_the_console_script_points_at_the_cli() -> None:
    (script,) = [
        ep
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name == "scanqueue"
    ]
    assert callable(script.load())


def test_celery_finds_the_app_with_dash_a_scanqueue() -> None:
    # In a fresh interpreter, the way `celery -A scanqueue` looks it up.
    code = (
        "from celery.app.utils import find_app; "
        "app = find_app('scanqueue'); "
        "app.loader.import_default_modules(); "
        "print(type(app).__name__, 'scanqueue.run_scan' in app.tasks)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["Celery", "True"]


def test_the_provider_kind_api_imports_where_docs_real_runner_says() -> None:
    from scanqueue.runners.providers import Finding, ProviderConfigError, ProviderError

    assert issubclass(ProviderConfigError, ProviderError)
    assert Finding.__name__ == "Finding"
