#!/usr/bin/env bash
# Build a coverage-instrumented copy of genmon_native (streams/native-rs/) for the fuzz target.
#   fuzz/build_native.sh            # -> fuzz/.build/lib/genmon_native.abi3.so
# libFuzzer (inside atheris) is guided by the SanitizerCoverage counters this build adds to the
# Rust code, on stable Rust (the flags cargo-fuzz passes, without a sanitizer). Overflow
# checks and debug assertions are on, so an arithmetic overflow is a crash, not a wrong value.
# Cheap when nothing changed (cargo's own incremental check). The installed module in .venv
# is left alone: the fuzz target puts this one first on sys.path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
host=$(rustc -vV | sed -n 's/^host: //p')
out=fuzz/.build
# --target keeps the flags off build scripts and proc macros (host tools, not instrumented).
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --quiet --release --target "$host" --target-dir "$out/target" \
  --manifest-path streams/native-rs/Cargo.toml "$@"
mkdir -p "$out/lib"
cp "$out/target/$host/release/libgenmon_native.so" "$out/lib/genmon_native.abi3.so.tmp"
mv "$out/lib/genmon_native.abi3.so.tmp" "$out/lib/genmon_native.abi3.so"
echo "$out/lib/genmon_native.abi3.so"
