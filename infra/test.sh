#!/usr/bin/env bash
# The whole test suite against real services: bootstrap, start Kafka and PostgreSQL, run
# pytest (arguments pass through), and stop the services again whatever happens.
#   infra/test.sh                      # everything
#   infra/test.sh tests/test_compose.py -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

infra/bootstrap.sh

trap '.venv/bin/genmon infra down || true' EXIT
trap 'exit 130' INT TERM
.venv/bin/genmon infra up --postgres

status=0
.venv/bin/pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "infra/test.sh: pytest collected no tests, which counts as a failure" >&2
fi
exit "$status"
