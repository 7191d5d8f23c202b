#!/usr/bin/env bash
# The test command (README): creates .venv if needed, installs scanqueue with its
# test tools (and Debian's chromium, for the console's browser tests, when missing),
# then runs ruff, mypy and the whole pytest suite against the real PostgreSQL
# (127.0.0.1:5432), Redis (redis-server binary + 127.0.0.1:6379) and RabbitMQ
# (127.0.0.1:5672). With CI set, a missing service or browser fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The console's browser tests drive Debian's Chromium through Playwright (never a
# downloaded browser). Install it when missing; without it they skip, or fail with CI.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "== installing chromium (apt-get)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      $SUDO apt-get install -y -qq chromium >/dev/null; }; then
    echo "could not install chromium: the console's browser tests will skip (fail with CI=true)"
  fi
fi
echo "== ruff"
.venv/bin/ruff check scanqueue tests celeryconfig.py bench
.venv/bin/ruff format --check scanqueue tests celeryconfig.py bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# Test files run in parallel, each whole in one process (its fixtures and real
# workers stay together); every test has its own database, queue and servers.
exec .venv/bin/pytest -n "${SCANQUEUE_TEST_PROCESSES:-2}" --dist loadfile "$@"
