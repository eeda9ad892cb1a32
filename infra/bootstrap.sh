#!/usr/bin/env bash
# One-time (and idempotent) setup of a checkout: the virtualenv with genmon and its dev
# tools, the Kafka jars, and PostgreSQL's server binaries. Cheap when nothing changed.
#   PYTHON=python3.12 infra/bootstrap.sh   # another interpreter for a new .venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3.11}
# pip builds the native ingest module (streams/native-rs/, the genmon-native distribution)
# with cargo; rustup puts it in ~/.cargo/bin, which a non-login shell may not have on its PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $python"
  "$python" -m venv .venv
fi

# pip is only asked again when pyproject.toml or the native module's sources (built by cargo
# at install, see genmon.streams.native) changed since the last install.
stamp=.venv/.genmon-pyproject.sha256
wanted=$(cat pyproject.toml streams/native-rs/pyproject.toml streams/native-rs/Cargo.toml streams/native-rs/Cargo.lock \
  streams/native-rs/src/*.rs | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] \
  || ! .venv/bin/python -c 'import genmon.cli, genmon_native' 2>/dev/null; then
  echo "bootstrap: installing genmon and its dev dependencies into .venv"
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  .venv/bin/python -m pip install --quiet --force-reinstall --no-deps ./streams/native-rs
  echo "$wanted" > "$stamp"
fi

# Headless Chromium renders `genmon replay --report` pages in tests/replay/test_report.py and
# drives the dashboard in tests/api/test_api_browser.py (Playwright with this executable).
# Debian's package is the only browser that installs here (no network but the registries).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing chromium (apt) for the report and dashboard browser tests"
  if ! apt-cache show chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || { apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
fi

.venv/bin/genmon infra prepare --postgres
