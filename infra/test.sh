#!/usr/bin/env bash
# The whole test suite against real services: bootstrap, lint and type-check, start Kafka
# and PostgreSQL, run pytest (arguments pass through), and stop the services again whatever happens.
#   infra/test.sh                      # everything
#   infra/test.sh tests/test_compose.py -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

infra/bootstrap.sh

# Lint and types first: cheap, and a red one fails the run like a failing test.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy genmon schemas detectors streams infra

trap '.venv/bin/genmon infra down || true' EXIT
trap 'exit 130' INT TERM
.venv/bin/genmon infra up --postgres

status=0
.venv/bin/pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "infra/test.sh: pytest collected no tests, which counts as a failure" >&2
fi
exit "$status"
