"""The native decoder's fuzz target (fuzz/decoder_target.py): its saved corpus, a short
coverage-guided run, and the regressions earlier runs found.

Every input is checked the same way: the fast path may defer anything, but what it accepts
pydantic must accept unchanged, and must aggregate to the same state (see the target's
docstring). RELIABILITY.md records a longer run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fuzz.decoder_target import CORPUS, FUZZ, INSTRUMENTED, check, verdicts
from genmon.schemas.codec import REASONS

ROOT = FUZZ.parent
#: Executions of the CI run: a few seconds here (~5,000 exec/s under load, plus the corpus).
CI_RUNS = 20_000


def _corpus() -> list[Path]:
    return sorted(path for path in CORPUS.iterdir() if path.is_file())


def test_the_saved_corpus_holds_every_verdict() -> None:
    """The corpus keeps what the fuzzer starts from: events the fast path reads, valid ones
    it defers, sanitized ones, and every dead-letter reason."""
    seen = Counter(verdicts(path.read_bytes()) for path in _corpus())
    natives = {n for n, _ in seen}
    outcomes = {o for _, o in seen}
    assert natives == {"accepted", "deferred"}
    assert {("accepted", "valid"), ("deferred", "valid"), ("deferred", "sanitized")} <= set(seen)
    assert set(REASONS) <= outcomes, set(REASONS) - outcomes


def test_every_corpus_input_gets_the_same_verdict_on_both_paths() -> None:
    failures = []
    for path in _corpus():
        try:
            check(path.read_bytes())
        except AssertionError as exc:
            failures.append(f"{path.name}: {exc}")
    assert not failures, "\n".join(failures)


def _build_instrumented() -> None:
    """fuzz/build_native.sh: cheap when the sources did not change (cargo decides)."""
    built = subprocess.run(
        [str(FUZZ / "build_native.sh"), "-j2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    assert built.returncode == 0, (
        "fuzz/build_native.sh failed (it needs cargo, as the native module does: "
        f"infra/bootstrap.sh):\n{built.stderr[-3000:]}"
    )


def test_a_short_coverage_guided_run_finds_nothing(tmp_path: Path) -> None:
    """CI's bounded run: libFuzzer (atheris) guided by the instrumented Rust decoder's edges,
    starting from the saved corpus; new inputs go to a scratch folder."""
    _build_instrumented()
    assert (INSTRUMENTED / "genmon_native.abi3.so").exists()
    new = tmp_path / "new"
    new.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "decoder_target.py"),
            str(new),
            str(CORPUS),
            f"-runs={CI_RUNS}",
            "-seed=1",
            f"-rss_limit_mb={_rss_limit_mb()}",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = run.stdout + run.stderr
    findings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-")))
    assert run.returncode == 0 and not findings, (
        f"the fuzzer found a crash or a disagreement ({findings}); add the input as a"
        f" regression below:\n{log[-6000:]}"
    )
    assert f"genmon_native from {INSTRUMENTED / 'genmon_native.abi3.so'} (instrumented)" in log
    assert f"Done {CI_RUNS} runs" in log, log[-3000:]
    # Coverage counts the Rust decoder's edges: thousands, not the Python code's hundreds.
    inited = re.search(r"INITED cov: (\d+)", log)
    assert inited is not None and int(inited.group(1)) > 1000, log[-3000:]


# -- regressions and pinned cases ----------------------------------------------------------
# A crash or disagreement a fuzz run finds goes here (xfail(strict=True) with the decoder
# bug's reason until it is fixed). Runs so far (RELIABILITY.md: 22 million executions)
# found none; these pin the edges where the two parsers could part (every one agrees now).

_BASE = b'{"request_id": "r1", "model_id": "chat", "latency_ms": 5'


def _with(fields: bytes, started: bytes = b"2026-11-29T10:00:00Z") -> bytes:
    return _BASE + b', "started_at": "' + started + b'"' + fields + b"}"


PINNED = {
    "offset +23:59": _with(b"", b"2026-11-29T10:00:00+23:59"),
    "last instant read natively": _with(b"", b"2200-12-31T23:59:59.999999-23:59"),
    "before the epoch in UTC": _with(b"", b"1970-01-01T00:00:00.5+00:01"),
    "seven fraction digits": _with(b"", b"2026-11-29T10:00:00.1234567Z"),
    "offset with seconds": _with(b"", b"2026-11-29T10:00:00+01:00:30"),
    "leap second": _with(b"", b"2026-11-29T23:59:60Z"),
    "latency past its bound by less than a float step": _with(b"").replace(
        b"5", b"86400000.0000000001", 1
    ),
    "subnormal latency": _with(b"").replace(b": 5", b": 4.9e-324", 1),
    "long mantissa": _with(b"").replace(b": 5", b": 123456.78901234567890123", 1),
    "negative zero count": _with(b', "prompt_tokens": -0'),
    "count with an exponent": _with(b', "completion_tokens": 1E2'),
    "explicit nulls": _with(b', "finish_reason": null, "error_code": null, "subject_id": null'),
    "null version": _with(b', "model_version": null'),
    "ids with spaces": _with(b', "subject_id": " s\\t"'),
    "metadata number out of float range": _with(b', "metadata": {"k": 1e400}'),
    "metadata NaN": _with(b', "metadata": {"k": NaN}'),
    "metadata repeated nested key": _with(b', "metadata": {"a": {"x": 1, "x": 2}}'),
    "line separators as the answer": _with(b', "response": "\\u2028\\u0085 "'),
    "byte order mark": b"\xef\xbb\xbf" + _with(b""),
    "form feed after the object": _with(b"") + b"\n\x0c",
    "time to first token repeated": _with(
        b', "time_to_first_token_ms": 10, "time_to_first_token_ms": 1'
    ),
    "messages null": _with(b', "messages": null'),
    "most messages": _with(
        b', "messages": [' + b",".join([b'{"role":"tool","content":""}'] * 256) + b"]"
    ),
    "one message too many": _with(
        b', "messages": [' + b",".join([b'{"role":"user","content":""}'] * 257) + b"]"
    ),
    "message text one past its limit": _with(
        b', "messages": [{"role": "user", "content": "' + b"m" * 32_769 + b'"}]'
    ),
    "message text escaped to its limit": _with(
        b', "messages": [{"role": "user", "content": "' + b"\\u00e9" * 32_768 + b'"}]'
    ),
    "message role repeated": _with(b', "messages": [{"role": "user", "role": "x", "content": ""}]'),
    "message role with a NUL": _with(b', "messages": [{"role": "user\\u0000", "content": ""}]'),
}


@pytest.mark.parametrize("data", PINNED.values(), ids=PINNED.keys())
def test_pinned_edge_cases_agree(data: bytes) -> None:
    check(data)


def _rss_limit_mb() -> int:
    """libFuzzer's memory guard for the child: Linux keeps a process's peak RSS across
    exec, so the child starts at this test process's peak (over 2 GB late in the suite),
    which libFuzzer's default 2 GB limit would call an out-of-memory before any input."""
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return max(4096, peak_mb + 2048)
