#!/usr/bin/env bash
# The test command (README): creates .venv if needed, installs scanqueue with its
# test tools, then runs ruff, mypy and the whole pytest suite against the real
# PostgreSQL (127.0.0.1:5432), Redis (redis-server binary + 127.0.0.1:6379) and
# RabbitMQ (127.0.0.1:5672). With CI set, a missing service fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "== ruff"
.venv/bin/ruff check scanqueue tests celeryconfig.py bench
.venv/bin/ruff format --check scanqueue tests celeryconfig.py bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# Test files run in parallel, each whole in one process (its fixtures and real
# workers stay together); every test has its own database, queue and servers.
exec .venv/bin/pytest -n "${SCANQUEUE_TEST_PROCESSES:-2}" --dist loadfile "$@"
