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
.venv/bin/mypy genmon schemas detectors streams incidents replay retrain infra scheduler privacy api
# The native module's own unit tests (tests/streams/test_native.py checks it against Python).
PATH="$HOME/.cargo/bin:$PATH" cargo test --quiet --release --manifest-path streams/native-rs/Cargo.toml

# PostgreSQL runs as the `postgres` OS user, which must reach the database files under this
# checkout; a clone in a folder private to root (as `mktemp -d` makes) would hide them.
# Let that user traverse (not list) each folder above the checkout that blocks it.
if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
  dir=""
  IFS=/ read -ra parts <<<"${PWD#/}"
  for part in "${parts[@]}"; do
    dir="$dir/$part"
    if ! runuser -u postgres -- test -x "$dir"; then
      echo "infra/test.sh: letting the postgres user traverse $dir (chmod o+x)"
      chmod o+x "$dir"
    fi
  done
fi

trap '.venv/bin/genmon infra down || true' EXIT
trap 'exit 130' INT TERM
.venv/bin/genmon infra up --postgres

status=0
.venv/bin/pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "infra/test.sh: pytest collected no tests, which counts as a failure" >&2
fi
exit "$status"
