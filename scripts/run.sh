#!/usr/bin/env bash
# The quickstart (README): one command that runs scanqueue on the embedded default
# — SQLite database and SQLite broker in the current directory, no servers. It
# creates .venv if needed, upgrades the schema and starts an autoscaling worker
# with its embedded bridge. Enqueue from another terminal with
#   .venv/bin/scanqueue enqueue --provider aws --framework soc2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e .
.venv/bin/scanqueue db upgrade
exec .venv/bin/celery -A scanqueue worker --autoscale="${SCANQUEUE_MAX_CONCURRENCY:-6},${SCANQUEUE_CONCURRENCY:-2}" -l info "$@"
