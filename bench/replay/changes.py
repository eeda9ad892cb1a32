"""Known changes injected into a replay stream, with their ground truth.

:func:`inject` applies one :class:`Change` to a stream (any list of wire events, e.g.
:func:`bench.replay.traffic.stationary`'s) and returns the changed copy and its
:class:`GroundTruth`, what a detector should report. Kinds: ``latency_regime``,
``error_burst``, ``refusal_jump``, ``language_switch``, ``topic_switch``,
``negative_feedback`` and ``bad_deploy``; see :class:`Change` for what each does and
:data:`SIGNALS` for the genmon signals that should fire. Changed events name their new
sources in ``metadata`` (``text_source``, ``latency_record``) as the stream's do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.replay.events import _fail, _iso, arrival_time, event_time, is_inference
from bench.replay.latency import SLOW_PROVIDER, _record, timings
from bench.replay.sources import _xstest_texts, load_provider, load_utterances

#: genmon's signals that should fire for each change kind (names as in genmon's findings).
SIGNALS: dict[str, tuple[str, ...]] = {
    "latency_regime": ("ttft", "tpot"),
    "error_burst": ("error_rate",),
    "refusal_jump": ("refusal_rate", "negative_feedback"),
    "language_switch": ("embedding_prompt",),
    "topic_switch": ("embedding_prompt",),
    "negative_feedback": ("negative_feedback",),
    "bad_deploy": ("ttft",),
}
CHANGE_KINDS = tuple(SIGNALS)


@dataclass(frozen=True)
class Change:
    """One change from ``at`` (offset from the stream's start) for ``duration`` (None: to
    the end), limited to inferences whose segment holds ``segment``'s items (None: all)
    and to ``model_id`` (None: all models). Knobs by kind:

    - ``latency_regime``: latencies from the LLMPerf ``provider`` (same latency model;
      failed requests get its rejection latency), or ttft and tpot times ``factor`` when it
      is set;
    - ``error_burst``: ``error_share`` of requests fail (429, empty answer, no feedback);
    - ``refusal_jump``: ``version`` is deployed; XSTest prompts get ``refusal_model``'s
      completions (Llama-2 refuses many safe prompts), feedback from their labels; other
      prompts keep their answers;
    - ``language_switch``: prompts become xSID utterances in ``language`` (answers stay:
      no real answers exist for them; locale stays: the service does not know);
    - ``topic_switch``: prompts become CLINC150 utterances of ``domain`` (``"banking77"``:
      BANKING77's);
    - ``negative_feedback``: feedback created from ``at`` is thumbs down with probability
      ``down_share``;
    - ``bad_deploy``: ``version`` is deployed with ttft times ``ttft_factor``.
    """

    kind: str
    at: timedelta
    duration: timedelta | None = None
    segment: Mapping[str, str] | None = None
    model_id: str | None = None
    provider: str = SLOW_PROVIDER
    factor: float | None = None
    error_share: float = 0.87
    version: str = "v2"
    refusal_model: str = "llama2orig"
    language: str = "ja"
    domain: str = "travel"
    down_share: float = 0.7
    ttft_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in SIGNALS:
            raise ValueError(f"unknown change {self.kind!r}; one of {', '.join(SIGNALS)}")
        if self.at < timedelta(0):
            raise ValueError(f"at must be >= 0, got {self.at}")
        if self.duration is not None and self.duration <= timedelta(0):
            raise ValueError(f"duration must be > 0 or None, got {self.duration}")
        for name in ("error_share", "down_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class GroundTruth:
    """What the injected change is, for measuring a detector's delay and its misses."""

    kind: str
    start: datetime  # the stream's start + at: delays are measured from here
    end: datetime | None
    model_id: str | None
    model_version: str | None  # the version carrying the change (deploys), else None
    segment: dict[str, str] | None
    signals: tuple[str, ...]  # genmon signals that should fire
    affected: int  # events changed
    first_affected_at: datetime | None  # event time of the first changed event
    details: dict[str, Any] = field(default_factory=dict)

    def delay(self, detected_at: datetime) -> timedelta:
        """How long after the change began a detector fired."""
        return detected_at - self.start

    def to_dict(self) -> dict[str, Any]:
        def iso(when: datetime | None) -> str | None:
            return None if when is None else _iso(when)

        return {
            "kind": self.kind,
            "start": iso(self.start),
            "end": iso(self.end),
            "model_id": self.model_id,
            "model_version": self.model_version,
            "segment": self.segment,
            "signals": list(self.signals),
            "affected": self.affected,
            "first_affected_at": iso(self.first_affected_at),
            "details": self.details,
        }


@dataclass
class _Scope:
    """What an injection works on: the hit events (copies) and the feedback by request."""

    hits: list[dict[str, Any]]
    feedback: dict[str, list[dict[str, Any]]]
    change: Change
    data_dir: Path
    rng: np.random.Generator
    dropped: set[int] = field(default_factory=set)  # id() of feedback events to remove


def inject(
    events: Sequence[Mapping[str, Any]],
    change: Change,
    data_dir: Path,
    *,
    seed: int,
    start: datetime | None = None,
) -> tuple[list[dict[str, Any]], GroundTruth]:
    """``events`` with ``change`` applied from ``start + change.at``, and its ground truth.

    ``start`` is the stream's start (default: the first inference's ``started_at``, which
    may be a little after the ``start`` the stream was built with). The input is not
    modified; events the change does not touch are equal to the input's. Inferences are
    hit by their ``started_at``, feedback (``negative_feedback``) by its ``created_at``.
    """
    copies = [dict(e) for e in events]
    inferences = [e for e in copies if is_inference(e)]
    if start is None:
        start = min((event_time(e) for e in inferences), default=None)
    if start is None:
        raise ValueError("no inference events to inject a change into")
    begin = start + change.at
    end = None if change.duration is None else begin + change.duration
    feedback: dict[str, list[dict[str, Any]]] = {}
    for e in copies:
        if not is_inference(e):
            feedback.setdefault(e["request_id"], []).append(e)
    if change.kind == "negative_feedback":
        pool = [e for e in copies if not is_inference(e)]
    else:
        pool = inferences
    hits = [e for e in pool if _hit(e, change, begin, end)]
    scope = _Scope(hits, feedback, change, Path(data_dir), _change_rng(seed, change))
    changed = _APPLY[change.kind](scope)
    out = sorted((e for e in copies if id(e) not in scope.dropped), key=arrival_time)
    return out, _truth(change, begin, end, changed)


def _truth(
    change: Change, begin: datetime, end: datetime | None, changed: list[dict[str, Any]]
) -> GroundTruth:
    return GroundTruth(
        kind=change.kind,
        start=begin,
        end=end,
        model_id=change.model_id,
        model_version=change.version if change.kind in ("refusal_jump", "bad_deploy") else None,
        segment=None if change.segment is None else dict(change.segment),
        signals=SIGNALS[change.kind],
        affected=len(changed),
        first_affected_at=min((event_time(e) for e in changed), default=None),
        details=_details(change),
    )


def _hit(event: Mapping[str, Any], change: Change, begin: datetime, end: datetime | None) -> bool:
    if change.model_id is not None and event["model_id"] != change.model_id:
        return False
    segment = event.get("segment") or {}
    if change.segment and any(segment.get(k) != v for k, v in change.segment.items()):
        return False
    when = event_time(event)
    return begin <= when and (end is None or when < end)


def _change_rng(seed: int, change: Change) -> np.random.Generator:
    return np.random.default_rng([seed, CHANGE_KINDS.index(change.kind), 0x6A6D])


def _details(change: Change) -> dict[str, Any]:
    knobs: dict[str, tuple[str, ...]] = {
        "latency_regime": ("provider", "factor"),
        "error_burst": ("error_share",),
        "refusal_jump": ("version", "refusal_model"),
        "language_switch": ("language",),
        "topic_switch": ("domain",),
        "negative_feedback": ("down_share",),
        "bad_deploy": ("version", "ttft_factor"),
    }
    return {name: getattr(change, name) for name in knobs[change.kind]}


def _answered(event: Mapping[str, Any]) -> bool:
    return event["status"] == "ok" and event.get("time_to_first_token_ms") is not None


def _set_latency(scope: _Scope, event: dict[str, Any], ttft: float | None, latency: float) -> None:
    """New timings for one inference; its feedback moves with its finish time."""
    old_finish = datetime.fromisoformat(event["finished_at"])
    finished = datetime.fromisoformat(event["started_at"]) + timedelta(milliseconds=latency)
    event["latency_ms"], event["finished_at"] = float(latency), _iso(finished)
    if ttft is not None:
        event["time_to_first_token_ms"] = float(ttft)
    for fb in scope.feedback.get(event["request_id"], ()):
        fb["created_at"] = _iso(datetime.fromisoformat(fb["created_at"]) + (finished - old_finish))


def _tpot_ms(event: Mapping[str, Any]) -> float:
    """Time per output token, as genmon derives it: (latency - ttft) / (tokens - 1)."""
    n = event.get("completion_tokens") or 0
    return (event["latency_ms"] - event["time_to_first_token_ms"]) / (n - 1) if n > 1 else 0.0


def _latency_regime(scope: _Scope) -> list[dict[str, Any]]:
    change, hits = scope.change, scope.hits
    if change.factor is not None:
        for e in hits:
            if _answered(e):
                ttft = e["time_to_first_token_ms"] * change.factor
                n = max(e["completion_tokens"] - 1, 0)
                _set_latency(scope, e, ttft, ttft + _tpot_ms(e) * change.factor * n)
        return [e for e in hits if _answered(e)]
    perf = load_provider(scope.data_dir, change.provider)
    records = scope.rng.integers(len(perf.ttft_s), size=len(hits))
    prompt = np.array([e.get("prompt_tokens") or 0 for e in hits], dtype=np.int64)
    completion = np.array([e.get("completion_tokens") or 0 for e in hits], dtype=np.int64)
    ttft, latency = timings(perf, records, prompt, completion)
    for i, e in enumerate(hits):
        answered = _answered(e)
        rejected = perf.ttft_s[records[i]] * 1e3
        _set_latency(scope, e, ttft[i] if answered else None, latency[i] if answered else rejected)
        e["metadata"] = {**e.get("metadata", {}), "latency_record": _record(perf, records[i])}
    return hits


def _error_burst(scope: _Scope) -> list[dict[str, Any]]:
    failing = scope.rng.random(len(scope.hits)) < scope.change.error_share
    changed = []
    for e, fails in zip(scope.hits, failing, strict=True):
        if fails and e["status"] == "ok":
            latency = _rejection_ms(scope.data_dir, e)
            _fail(e)
            _set_latency(scope, e, None, latency)
            scope.dropped.update(id(fb) for fb in scope.feedback.get(e["request_id"], ()))
            changed.append(e)
    return changed


def _rejection_ms(data_dir: Path, event: Mapping[str, Any]) -> float:
    """A 429's latency: the event's LLMPerf record's ttft without prefill (as in
    :func:`bench.replay.traffic.stationary`); the event's ttft when it names no record."""
    name, _, position = (event.get("metadata") or {}).get("latency_record", "").partition(":")
    if name and position.isdigit():
        perf = load_provider(data_dir, name)
        return float(perf.ttft_s[perf.row(int(position))] * 1e3)
    return float(event.get("time_to_first_token_ms") or event["latency_ms"])


def _refusal_jump(scope: _Scope) -> list[dict[str, Any]]:
    answers = _xstest_texts(scope.data_dir, scope.change.refusal_model)
    for e in scope.hits:
        e["model_version"] = scope.change.version
        answer = answers.get(e["prompt"])
        if answer is None or e["status"] != "ok":
            continue
        e["response"] = answer.response
        e["metadata"] = {**e.get("metadata", {}), "text_source": answer.source}
        for fb in scope.feedback.get(e["request_id"], ()):
            fb["thumbs"] = answer.thumbs
    return scope.hits


def _prompt_switch(source: Callable[[Change], str]) -> Callable[[_Scope], list[dict[str, Any]]]:
    """An injection replacing the hit prompts with utterances of ``source(change)``."""

    def apply(scope: _Scope) -> list[dict[str, Any]]:
        utterances = load_utterances(scope.data_dir, source(scope.change))
        picks = scope.rng.integers(len(utterances), size=len(scope.hits))
        for e, pick in zip(scope.hits, picks, strict=True):
            origin, e["prompt"] = utterances[pick]
            e["metadata"] = {**e.get("metadata", {}), "text_source": origin}
        return scope.hits

    return apply


def _topic(change: Change) -> str:
    return "banking77" if change.domain == "banking77" else f"clinc150:{change.domain}"


def _negative_feedback(scope: _Scope) -> list[dict[str, Any]]:
    down = scope.rng.random(len(scope.hits)) < scope.change.down_share
    for fb, is_down in zip(scope.hits, down, strict=True):
        fb["thumbs"] = "down" if is_down else "up"
    return scope.hits


def _bad_deploy(scope: _Scope) -> list[dict[str, Any]]:
    factor = scope.change.ttft_factor
    for e in scope.hits:
        e["model_version"] = scope.change.version
        if _answered(e):
            ttft = e["time_to_first_token_ms"]
            _set_latency(scope, e, ttft * factor, e["latency_ms"] + (factor - 1) * ttft)
    return scope.hits


_APPLY: dict[str, Callable[[_Scope], list[dict[str, Any]]]] = {
    "latency_regime": _latency_regime,
    "error_burst": _error_burst,
    "refusal_jump": _refusal_jump,
    "language_switch": _prompt_switch(lambda change: f"xsid:{change.language}"),
    "topic_switch": _prompt_switch(_topic),
    "negative_feedback": _negative_feedback,
    "bad_deploy": _bad_deploy,
}
