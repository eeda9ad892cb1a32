"""The native ingest path: inference batches decoded and aggregated in Rust.

``genmon_native`` (the crate in ``streams/native-rs/``, built by ``pip install``) is
a *fast path* beside the pydantic one, never a second definition of the schema:

- :meth:`Decoder.decode` accepts only events it reads exactly as
  ``InferenceEvent.model_validate_json`` would, and defers every other message to the
  Python validator (:func:`genmon.schemas.codec.decode`), which stays the one authority on
  what is valid and on the dead-letter reason. A deferred message that is valid joins the
  batch in its canonical form (``model_dump_json``), which the fast path always reads.
  What it defers: absent ``request_id`` or ``started_at`` (their defaults are generated),
  numbers in strings, ``5.0`` for a count, timestamps not of the form
  ``YYYY-MM-DDTHH:MM:SS[.ffffff](Z|±HH:MM)`` or outside 1970-2200, repeated keys, any
  string (metadata included) holding NUL or a lone surrogate (the Python validator refuses
  them in identifiers and replaces them in free text, and counts what it changed),
  metadata nested deeper than 128 levels, and anything invalid. Should it refuse a
  canonical form too (a year outside its range, deep metadata), ingest decodes the whole
  batch with pydantic instead, counting each message once.
- :meth:`Batch.aggregate` does the per-event work of
  :meth:`~genmon.streams.windows.state.WindowState.on_inferences` for one partition:
  the offset filter, future and late events, the quality signals
  (:mod:`genmon.streams.windows.quality_signals`, the same phrase list), grouping by
  ``(model, version, pane, attributes)``, and putting every inference into the
  partition's native :class:`JoinTable` (:func:`join_table`, the Rust twin of
  :class:`genmon.streams.windows.join.JoinTable`). Python then does the per-group and per-pane
  work it did before, so both paths write the same state; ``tests/streams/test_native.py`` runs
  both on the same streams and compares, and drives both join tables with the same
  operations.

Without the compiled module (a source checkout without a Rust toolchain) :func:`decoder_for`
returns ``None`` and ingest takes the Python path.

>>> from genmon.streams.windows.quality_signals import QualitySignals
>>> decoder = decoder_for(QualitySignals.default())
>>> batch = decoder.decode([b'{"request_id": "r1", "model_id": "chat", "latency_ms": 5,'
...                         b' "started_at": "2026-11-29T10:00:00Z"}', b'{"model_id": "chat"}'],
...                        [0, 0], [7, 8], MAX_EVENT_BYTES)
>>> len(batch), batch.deferred
(1, [1])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genmon.schemas.events import MAX_EVENT_BYTES, InferenceEvent
from genmon.streams.windows.aggregates import PaneKey, merge_group
from genmon.streams.windows.quality_signals import (
    _AMBIGUITY_ORDER,
    _LANGUAGES_OF_WORD,
    QualitySignals,
)
from genmon.streams.windows.stats import WindowStats, _keep_flagged, _Summary

if TYPE_CHECKING:
    from genmon.streams.windows.segment_cap import SegmentCap

try:
    import genmon_native as _native
except ImportError:  # pragma: no cover - a checkout built without Rust
    _native = None  # type: ignore[assignment]

__all__ = ["MAX_EVENT_BYTES", "available", "decoder_for", "dumps", "join_table", "pane_stats"]


def available() -> bool:
    """Whether the compiled module is importable."""
    return _native is not None


def dumps(value: Any) -> bytes:
    """JSON bytes of a JSON-like value, 4x ``json.dumps``; ``json.loads`` reads them back.

    Raises ``TypeError`` or ``OverflowError`` for a value it cannot encode (non-str keys,
    ints beyond 64 bits, other types): fall back to :func:`json.dumps` then.

    >>> dumps({"a": [1, 2.0, None, "x\\n"]})
    b'{"a":[1,2.0,null,"x\\\\n"]}'
    """
    if _native is None:
        raise TypeError("genmon_native is not built")
    return _native.dumps(value)


def join_table(ttl_ms: int, max_text_chars: int) -> _native.JoinTable:
    """The native :class:`genmon.streams.windows.join.JoinTable` (the module must be built)."""
    if _native is None:
        raise RuntimeError(
            "genmon_native is not built: reinstall genmon with a Rust toolchain"
            " (infra/bootstrap.sh) or set GENMON_WORKER__NATIVE_INGEST=false"
        )
    return _native.JoinTable(ttl_ms, max_text_chars)


def decoder_for(quality: QualitySignals) -> _native.Decoder | None:
    """A native decoder computing ``quality``'s signals, or ``None`` without the module."""
    if _native is None:
        return None
    refusals = quality.refusals
    index = {lang: i for i, lang in enumerate(_AMBIGUITY_ORDER)}
    words = {word: [index[lang] for lang in langs] for word, langs in _LANGUAGES_OF_WORD.items()}
    return _native.Decoder(
        list(refusals.openings),
        list(refusals.anywhere),
        refusals.scan_chars,
        list(_AMBIGUITY_ORDER),
        words,
    )


def pane_stats(
    groups: list[dict[str, Any]],
    batch: Any,
    quality: QualitySignals,
    relative_accuracy: float,
    exemplars: int,
    redact_exemplars: bool,
    segment_cap: SegmentCap,
) -> dict[PaneKey, WindowStats]:
    """:func:`~genmon.streams.windows.aggregates.aggregate_inferences` for native groups."""
    out: dict[PaneKey, WindowStats] = {}
    for group in groups:
        stats = _group_stats(group, batch, quality, relative_accuracy, exemplars, redact_exemplars)
        model, version, pane = group["model"], group["version"], group["pane"]
        segments = segment_cap.segments(model, group["attributes"], group["requests"])
        merge_group(out, model, version, pane, segments, stats, exemplars, redact_exemplars)
    return out


def _group_stats(
    group: dict[str, Any],
    batch: Any,
    quality: QualitySignals,
    relative_accuracy: float,
    exemplars: int,
    redact_exemplars: bool,
) -> WindowStats:
    stats = WindowStats(relative_accuracy, exemplars, redact_exemplars)
    stats.requests = group["requests"]
    stats.errors = group["errors"]
    stats.by_status = group["by_status"]
    stats.by_error_code = group["by_error_code"]
    stats._latencies = group["latencies"]
    stats._ttfts = group["ttfts"]
    stats._tpots = group["tpots"]
    stats.prompt_tokens = _Summary(*group["prompt_tokens"])
    stats.completion_tokens = _Summary(*group["completion_tokens"])
    stats.response_chars = _Summary(*group["response_chars"])
    stats.empty = group["empty"]
    stats.truncated = group["truncated"]
    stats.refusal = group["refusal"]
    stats.languages = group["languages"]
    if stats.exemplars is not None:
        for index in group["flagged"]:
            # Flagged events are few (errors, refusals, ...): their pydantic form is built
            # only for the examples.
            event = InferenceEvent.model_validate_json(batch.raw(index))
            signals = quality.of(event)
            _keep_flagged(stats.exemplars, event, signals.empty, signals.truncated, signals.refusal)
    stats.saw("inference", group["max_offset"])
    return stats.flush()
