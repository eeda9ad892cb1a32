"""Write the seed inputs of ``fuzz/corpus/decoder/`` (one message value per file).

    .venv/bin/python fuzz/seed_corpus.py     # adds the seeds; existing files are kept

Seeds, valid and invalid: events built from the schema's fields and limits (each enum
member, each bound and one past it), the fixtures of ``tests/streams/test_native.py`` and
``tests/streams/test_hostile_input.py`` (texts, unstorable strings, timestamps, the hostile
mix), and one message per dead-letter reason of :mod:`genmon.schemas.codec`. Files are
named by the SHA-1 of their bytes, as libFuzzer names the inputs it adds, so seeds and
merged findings share one folder without clashes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus" / "decoder"
#: libFuzzer's default ``-max_len`` in decoder_target.py; larger seeds are replayed by the
#: test only (the fuzzer would truncate them), so only a few are kept.
FUZZ_MAX_LEN = 8192

BASE: dict[str, Any] = {
    "request_id": "r1",
    "model_id": "chat",
    "latency_ms": 5,
    "started_at": "2026-11-29T10:00:00Z",
}
FULL: dict[str, Any] = {
    "schema_version": 1,
    "request_id": "req-1",
    "model_id": "support-bot",
    "model_version": "v3",
    "started_at": "2026-11-29T10:00:00.123456+02:00",
    "finished_at": "2026-11-29T10:00:01.5+02:00",
    "prompt": "How do I reset my password?",
    "response": "Open Settings, then Security, then Reset password.",
    "latency_ms": 1500.25,
    "time_to_first_token_ms": 120.5,
    "prompt_tokens": 12,
    "completion_tokens": 34,
    "status": "ok",
    "finish_reason": "stop",
    "segment": {"locale": "en", "tier": "pro"},
    "subject_id": "user-42",
    "metadata": {"trace": {"id": "abc", "spans": [1, 2.5, None, True]}, "k": "v"},
}
TIMES = [
    "2026-11-29T10:00:00Z",
    "2026-11-29T10:00:00.123+02:00",
    "2026-11-29T10:00:00.1234567Z",
    "2026-11-29T10:00:00",
    "2026-11-29 10:00:00Z",
    "2026-02-30T10:00:00Z",
    "2024-02-29T23:59:59.999999-23:59",
    "1969-12-31T23:59:59Z",
    "1970-01-01T00:00:00+01:00",
    "2200-12-31T23:59:59Z",
    "2201-01-01T00:00:00Z",
    "1900-01-01T00:00:00Z",
    "2026-11-29T10:00:00z",
    "2026-11-29T10:00:00+0200",
    "2026-11-29T10:00:00+02",
    "2026-11-29T10:00:00+01:00:30",
    "2026-11-29T23:59:60Z",
    "2026-11-29T10:00Z",
    "2026-11-29",
    "1764410400",
]


def _dumps(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _event(**changes: Any) -> bytes:
    return _dumps({**BASE, **changes})


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def schema_seeds() -> Iterator[bytes]:
    """Each field of ``InferenceEvent`` at and past its limits."""
    yield _dumps(FULL)
    yield _dumps(BASE)
    yield json.dumps(FULL, indent=2, ensure_ascii=True).encode()
    for status in ["ok", "error", "timeout", "cancelled", "content_filtered", "truncated", "x"]:
        yield _event(status=status, error_code="E42" if status != "ok" else None)
    for reason in ["stop", "length", "content_filter", "tool_calls", "other", None, "eos"]:
        yield _event(finish_reason=reason)
    for name, limit in [("request_id", 256), ("model_id", 256), ("model_version", 256)]:
        yield _event(**{name: "i" * limit})
        yield _event(**{name: "é" * (limit + 1)})
        yield _event(**{name: ""})
    yield _event(error_code="E" * 128)
    yield _event(error_code="E" * 129)
    for name in ["latency_ms", "time_to_first_token_ms"]:
        for value in [0, -0.0, 86_400_000, 86_400_000.000001, -1, 1e-300, "5", None, True]:
            yield _event(**{name: value})
    for name in ["prompt_tokens", "completion_tokens"]:
        for value in [0, 10_000_000, 10_000_001, -1, 5.0, "5", None, 2**64]:
            yield _event(**{name: value})
    for value in [1, 2, "1", 1.0, None]:
        yield _event(schema_version=value)
    yield _event(segment={f"k{i}": "v" for i in range(32)})
    yield _event(segment={f"k{i}": "v" for i in range(33)})
    yield _event(segment={"k" * 64: "v" * 256, "": "x"})
    yield _event(segment={"k" * 65: "v"})
    yield _event(segment={"k": "v" * 257})
    yield _event(segment={"k": 1})
    yield _event(metadata={f"k{i}": i for i in range(64)})
    yield _event(metadata={f"k{i}": i for i in range(65)})
    yield _event(metadata=[1])
    yield _event(subject_id=None)
    yield _event(subject_id="")
    yield _event(finished_at="2026-11-29T09:59:59Z")
    yield _event(finished_at=None)
    for t in TIMES:
        yield _event(started_at=t)
    for depth in (124, 125, 126, 127, 200):
        raw = _event()[:-1] + b', "metadata": {"k": ' + _nested(depth).encode() + b"}}"
        yield raw
    yield _event(prompt="p" * 32_768, response="r")
    yield _event(prompt="p" * 32_769)
    yield from message_seeds()


def message_seeds() -> Iterator[bytes]:
    """Chat ``messages``: each role, the count and text limits, and what is refused."""
    turns = [{"role": r, "content": "hi"} for r in ["system", "user", "assistant", "tool"]]
    yield _event(messages=turns, prompt="hi")
    yield _event(messages=[])
    yield _event(messages=None)
    yield _event(messages=[{"role": "user", "content": "x"}] * 256)
    yield _event(messages=[{"role": "user", "content": "x"}] * 257)
    yield _event(messages=[{"role": "user", "content": "m" * 32_769}])
    for bad in [{"role": "bot", "content": "x"}, {"role": "user"}, {"content": "x"}]:
        yield _event(messages=[bad])
    yield _event(messages=[{"role": "user", "content": "x", "name": "n"}])
    yield _event(messages=[{"role": "user", "content": None}])
    yield _event(messages=[{"role": "user", "content": "a\x00b"}])
    yield _event(messages=[{"role": "user", "content": "\ud800"}])
    yield _event(messages={"role": "user", "content": "x"})
    yield _event()[:-1] + b', "messages": [{"role": "user", "role": "tool", "content": "x"}]}'


def dead_letter_seeds() -> Iterator[bytes]:
    """One message per dead-letter reason (``genmon.schemas.codec.REASONS``)."""
    yield b""  # empty_payload
    yield b" \n\t"
    yield _event(prompt="x" * 32_769)  # oversized (a field)
    yield b"\xff\xfe" + b"x" * 50  # not_utf8
    yield _event(prompt="caf\xe9").replace("é".encode(), b"\xe9")
    yield b'{"model_id": "m1", "latency_ms": '  # bad_json
    yield _event()[:-1] + b",}"
    yield b"[1]"  # not_an_object
    yield b'"event"'
    yield b"null"
    yield _event(schema_version=2)  # unknown_schema_version
    yield b'{"model_id": "m1"}'  # missing_field
    yield _event(latency_ms="slow")  # wrong_type
    yield _event(temperature=0.2)  # unknown_field
    yield _event(latency_ms=-5)  # invalid_value


def fixture_seeds() -> Iterator[bytes]:
    """The fixtures of the native and hostile-input tests."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "streams")]
    import test_hostile_input
    import test_native

    for text in test_native.TEXTS:
        yield _event(response=text, prompt=text[:20])
    for text in test_native.UNSTORABLE:
        for field in ["prompt", "response", "model_id", "request_id", "error_code"]:
            yield json.dumps({**test_native.STORABLE_BASE, field: text}).encode()
        yield json.dumps({**test_native.STORABLE_BASE, "metadata": {"k": [text]}}).encode()
        yield json.dumps({**test_native.STORABLE_BASE, "segment": {text: "v"}}).encode()
    repeated = b'{"model_id": "a", "model_id": "b", "latency_ms": 1, "request_id": "r",'
    yield repeated + b' "started_at": "2026-11-29T10:00:00Z"}'
    yield _event()[:-1] + b', "segment": {"k": "1", "k": "2"}}'
    yield _event()[:-1] + b', "metadata": {"k": 1, "k": 2}}'
    yield _event()[:-1] + b', "metadata": {"a": {"k": 1, "k": 2}}}'
    for kind, raw in test_native._stream(7, 60):
        if kind == "inference":
            yield raw
    for _, value in test_hostile_input.inference_mix(3):
        if value is not None and len(value) <= test_hostile_input.MAX_EVENT_BYTES:
            yield value


def write(seeds: list[bytes]) -> int:
    """Write each seed (at most three above the fuzzer's input size); return how many are new."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    new, large = 0, 0
    for raw in seeds:
        if len(raw) > FUZZ_MAX_LEN:
            large += 1
            if large > 3:
                continue
        path = CORPUS / hashlib.sha1(raw).hexdigest()
        if not path.exists():
            path.write_bytes(raw)
            new += 1
    return new


def main() -> None:
    seeds = [*schema_seeds(), *dead_letter_seeds(), *fixture_seeds()]
    new = write(seeds)
    print(f"{new} new seeds in {CORPUS.relative_to(ROOT)} ({len(seeds)} generated)")


if __name__ == "__main__":
    main()
