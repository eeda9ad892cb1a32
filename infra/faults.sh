#!/usr/bin/env bash
# The full-length fault probes (tests/faults/run.py) against real services: bootstrap,
# start Kafka and PostgreSQL, run the probes (arguments pass through: --json, pytest -k ...)
# and print one table, and stop the services again whatever happens.
#   infra/faults.sh
#   infra/faults.sh --json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

infra/bootstrap.sh
trap '.venv/bin/genmon infra down || true' EXIT
trap 'exit 130' INT TERM
.venv/bin/genmon infra up --postgres
.venv/bin/python tests/faults/run.py "$@"
