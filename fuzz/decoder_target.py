"""Coverage-guided fuzz target: the native decoder's verdict against the pydantic path.

Every input is one Kafka message value. :func:`check` decodes it both ways and raises
:class:`Disagreement` when the fast path (``genmon_native``, :mod:`genmon.streams.native`)
breaks its contract with the one authority, :func:`genmon.schemas.codec.decode`:

- it accepts a message pydantic refuses, or one pydantic had to sanitize (NUL, lone
  surrogates);
- an event it accepts does not write the state the Python path writes for it (pane
  statistics, quality signals, event time, the join entry), compared through
  ``Batch.aggregate`` + :func:`~genmon.streams.native.pane_stats` and
  :func:`~genmon.streams.windows.aggregates.aggregate_inferences` + ``JoinTable``;
- it refuses the canonical form (``model_dump_json``) of a valid event for any reason but
  the two documented ones (a year outside 1970-2200, metadata nested deeper than it reads).

Deferring is always allowed: that is the fast path's "ask pydantic". Any other exception
(a Rust panic, a crash in the Python validator) is a finding too.

Run it (``fuzz/build_native.sh`` first: libFuzzer is then guided by the Rust decoder's own
edge counters, and overflow checks turn an arithmetic overflow into a crash)::

    fuzz/build_native.sh
    .venv/bin/python fuzz/decoder_target.py fuzz/corpus/decoder -max_total_time=600
    # new inputs go to the first folder given; fold them into the saved corpus with
    .venv/bin/python fuzz/decoder_target.py -merge=1 fuzz/corpus/decoder NEW_DIR

Half the mutations are libFuzzer's own byte mutations, half rewrite one field of a JSON
event (:mod:`event_mutator`), so that valid events, where both paths must also agree on
the content, stay a good part of what is tried. The target adds
``-dict=fuzz/decoder.dict``, ``-max_len=8192``, ``-rss_limit_mb=4096`` and an artifact prefix under
``fuzz/.build/artifacts/`` unless given. ``tests/streams/test_fuzz_decoder.py`` replays
the saved corpus through :func:`check` and runs a short, bounded session in CI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FUZZ = Path(__file__).resolve().parent
#: Where ``fuzz/build_native.sh`` puts the coverage-instrumented ``genmon_native``.
INSTRUMENTED = FUZZ / ".build" / "lib"
CORPUS = FUZZ / "corpus" / "decoder"
DICTIONARY = FUZZ / "decoder.dict"

# The geometry both paths aggregate with: 10 s panes, a 30 s hopping window.
PANE_MS = 10_000
PLAN = SimpleNamespace(
    pane_ms=PANE_MS, specs=[(10_000, 10_000), (30_000, 10_000)], expires_ms=600_000
)
#: Far beyond any event the decoder accepts (years up to 2200): nothing is "in the future".
NOW_MS = 2**62
JOIN_TTL_MS = 60_000
JOIN_MAX_TEXT_CHARS = 16
EXEMPLARS = 4
MAX_SEGMENT_VALUES = 8
#: serde_json's recursion limit: a document nested deeper is deferred even in canonical form.
MAX_NATIVE_DEPTH = 127


class Disagreement(AssertionError):
    """The native decoder and the pydantic path disagree about one message."""


class _Paths:
    """Both decoding paths, imported on first use (see :func:`paths`)."""

    def __init__(self) -> None:
        import genmon_native
        from genmon.detectors.sketch import DEFAULT_RELATIVE_ACCURACY
        from genmon.exceptions import SchemaError
        from genmon.schemas import codec
        from genmon.schemas.events import MAX_EVENT_BYTES, InferenceEvent
        from genmon.streams import native
        from genmon.streams.windows.aggregates import aggregate_inferences
        from genmon.streams.windows.join import JoinTable, inference_record
        from genmon.streams.windows.quality_signals import QualitySignals
        from genmon.streams.windows.segment_cap import SegmentCap

        self.module_file = str(genmon_native.__file__)
        self.quality = QualitySignals.default()
        decoder = native.decoder_for(self.quality)
        if decoder is None:
            raise RuntimeError(
                "genmon_native is not built: run infra/bootstrap.sh (or fuzz/build_native.sh)"
            )
        self.decoder = decoder
        self.alpha = DEFAULT_RELATIVE_ACCURACY
        self.schema_error = SchemaError
        self.decode = codec.decode
        self.max_bytes = MAX_EVENT_BYTES
        self.event_model = InferenceEvent
        self.native = native
        self.aggregate_inferences = aggregate_inferences
        self.join_table = JoinTable
        self.inference_record = inference_record
        self.segment_cap = SegmentCap


_PATHS: _Paths | None = None


def paths() -> _Paths:
    """The decoders, imported on the first input.

    Under libFuzzer the import must wait until atheris has loaded it (``Fuzz()``): the
    instrumented module's coverage hooks resolve against it.
    """
    global _PATHS
    if _PATHS is None:
        _PATHS = _Paths()
    return _PATHS


def verdicts(data: bytes) -> tuple[str, str]:
    """``(native, pydantic)``: ``accepted``/``deferred`` and ``valid``/``sanitized``/reason."""
    p = paths()
    batch = p.decoder.decode([data], [0], [0], p.max_bytes)
    sanitized: list[str] = []
    try:
        p.decode(data, p.event_model, sanitized=sanitized)
    except p.schema_error as exc:
        outcome = exc.reason
    else:
        outcome = "sanitized" if sanitized else "valid"
    return ("deferred" if batch.deferred else "accepted"), outcome


def check(data: bytes) -> None:
    """Raise :class:`Disagreement` when the native decoder breaks its contract on ``data``."""
    p = paths()
    batch = p.decoder.decode([data], [0], [0], p.max_bytes)
    accepted = not batch.deferred
    sanitized: list[str] = []
    try:
        event = p.decode(data, p.event_model, sanitized=sanitized)
    except p.schema_error as exc:
        if accepted:
            raise Disagreement(
                f"native accepted what pydantic refuses ({exc.reason}): {exc}"
            ) from None
        return
    if accepted:
        if sanitized:
            raise Disagreement(f"native accepted what pydantic sanitizes ({sanitized})")
        _same_state(p, batch, event, "raw")
        return
    canonical = event.model_dump_json().encode()
    if p.decoder.extend(batch, [canonical], [0], [0], p.max_bytes):
        if not _refusal_documented(event):
            raise Disagreement(f"native refused the canonical form {canonical[:300]!r}")
        return
    _same_state(p, batch, event, "canonical")


def _refusal_documented(event: Any) -> bool:
    """The two reasons the fast path may give for deferring a canonical form."""
    times = [t for t in (event.started_at, event.finished_at) if t is not None]
    return any(not 1970 <= t.year <= 2200 for t in times) or (
        1 + _depth(event.metadata) > MAX_NATIVE_DEPTH
    )


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _same_state(p: _Paths, batch: Any, event: Any, form: str) -> None:
    """The pane statistics and join entry of the natively read event equal the Python ones."""
    joins = p.native.join_table(JOIN_TTL_MS, JOIN_MAX_TEXT_CHARS)
    result = batch.aggregate(0, -1, NOW_MS, 0, {}, {}, PLAN, joins)
    counts = (result["fresh"], result["skipped"], result["skew"], result["late"])
    if counts != (1, 0, 0, 0):
        raise Disagreement(f"{form}: native (fresh, skipped, skew, late) = {counts}")
    native_panes = p.native.pane_stats(
        result["groups"],
        batch,
        p.quality,
        p.alpha,
        EXEMPLARS,
        False,
        p.segment_cap(MAX_SEGMENT_VALUES),
    )
    python_panes = p.aggregate_inferences(
        [(0, event)],
        PANE_MS,
        p.quality,
        p.alpha,
        exemplars=EXEMPLARS,
        segment_cap=p.segment_cap(MAX_SEGMENT_VALUES),
        redact_exemplars=False,
    )
    native_state = {key: stats.to_state() for key, stats in native_panes.items()}
    python_state = {key: stats.to_state() for key, stats in python_panes.items()}
    if native_state != python_state:
        raise Disagreement(f"{form}: panes differ\nnative: {native_state}\npython: {python_state}")
    python_joins = p.join_table(JOIN_TTL_MS, JOIN_MAX_TEXT_CHARS)
    record = p.inference_record(event, JOIN_MAX_TEXT_CHARS)
    python_joins.add_inference(event.model_id, event.request_id, record)
    if joins.entries() != python_joins.entries():
        raise Disagreement(
            f"{form}: join entries differ\nnative: {joins.entries()}\n"
            f"python: {python_joins.entries()}"
        )


def _one_input(data: bytes) -> None:
    global _announced
    if not _announced:
        _announced = True
        where = Path(paths().module_file)
        kind = "instrumented" if where.parent == INSTRUMENTED else "NOT instrumented"
        print(f"decoder_target: genmon_native from {where} ({kind})", flush=True)
    check(data)


_announced = False


def _with_defaults(argv: list[str]) -> list[str]:
    """``argv`` plus the dictionary, input size and artifact folder, unless given."""
    # -merge, -fork and -jobs run the target again as a shell command: argv[0] names it
    # with this interpreter (the file itself need not be executable).
    args = [f"{sys.executable} {Path(__file__).resolve()}", *argv[1:]]
    given = {arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("-")}
    if "-dict" not in given:
        args.append(f"-dict={DICTIONARY}")
    if "-max_len" not in given:
        args.append("-max_len=8192")
    if "-rss_limit_mb" not in given:
        # The interpreter with the worker's modules and the instrumented decoder already
        # holds ~2.2 GB before the first input on some machines, above libFuzzer's 2 GB
        # default: a false "out-of-memory" at start-up. A leak still stops the run at 4 GB.
        args.append("-rss_limit_mb=4096")
    if "-artifact_prefix" not in given:
        artifacts = FUZZ / ".build" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        args.append(f"-artifact_prefix={artifacts}/")
    return args


def main(argv: list[str]) -> None:
    """Fuzz :func:`check` with atheris (libFuzzer flags and corpus folders in ``argv``)."""
    import atheris

    if (INSTRUMENTED / "genmon_native.abi3.so").exists():
        sys.path.insert(0, str(INSTRUMENTED))
    else:
        print(
            "decoder_target: no instrumented build (run fuzz/build_native.sh): libFuzzer sees"
            " only the Python code's coverage",
            file=sys.stderr,
        )
    # The pydantic path's own Python code (codec, the event validators) guides too.
    with atheris.instrument_imports(include=["genmon.schemas"]):
        import genmon.schemas.codec
        import genmon.schemas.events  # noqa: F401
    sys.path.insert(0, str(FUZZ))
    from event_mutator import mutate

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return mutate(data, max_size, seed, atheris.Mutate)

    atheris.Setup(_with_defaults(argv), _one_input, custom_mutator=custom_mutator)
    # atheris loads libFuzzer when fuzzing starts; loaded globally, it resolves the coverage
    # hooks of the instrumented genmon_native, imported by the first input.
    sys.setdlopenflags(sys.getdlopenflags() | os.RTLD_GLOBAL)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
