#!/usr/bin/env bash
# The main job on embedded defaults: bootstrap, then `genmon demo` (a real Kafka broker,
# a real worker, real public data, a signed page to a local receiver). Arguments pass through.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
infra/bootstrap.sh
exec .venv/bin/genmon demo --data-dir "${GENMON_DATA_DIR:-../shared/datasets}" "$@"
