"""Windowed aggregates of inference traffic: pure data structures, no Faust.

A *series* is one ``(model_id, model_version, segment)``; ``segment`` is ``"*"`` (all
traffic of that version) or one ``key=value`` segment attribute, so an event with two
attributes feeds three series.

Windows are built from *panes* (the "panes" technique of Li et al., "No pane, no gain",
SIGMOD Record 2005): every event is added to exactly one pane of length
``gcd(tumbling, hopping size, hopping step)``, and a window's statistics are the merge of
its panes when it closes. Everything in :class:`WindowStats` is mergeable (counts, sums,
maxima, DDSketch quantile sketches), so this is exact, and each batch writes one pane per
touched series instead of one entry per overlapping hopping window.

>>> from genmon.schemas.events import InferenceEvent
>>> from genmon.streams.quality_signals import QualitySignals
>>> e = InferenceEvent(model_id="chat", latency_ms=100.0, segment={"locale": "fr"},
...                    response="Bonjour, le chat est là.")
>>> acc = aggregate_inferences([(None, e)], pane_ms=60_000, quality=QualitySignals.default())
>>> sorted(key.segment for key in acc)
['*', 'locale=fr']
>>> next(iter(acc.values())).summary()["requests"]
1
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from genmon.schemas.events import InferenceEvent, InferenceStatus
from genmon.streams.exemplars import Exemplars
from genmon.streams.quality_signals import QualitySignals
from genmon.streams.sketch import DEFAULT_RELATIVE_ACCURACY, QuantileSketch, add_counts

if TYPE_CHECKING:
    from genmon.streams.segment_cap import SegmentCap

#: Quantiles reported for latency, time to first token and time per output token.
QUANTILES = (0.5, 0.9, 0.95, 0.99)
ALL_SEGMENTS = "*"
#: Statuses counted as errors; truncated and content-filtered answers are quality signals,
#: cancelled requests are the client's choice. ``by_status`` keeps every status anyway.
ERROR_STATUSES = frozenset({InferenceStatus.ERROR, InferenceStatus.TIMEOUT})
#: Most bytes (as JSON) the raw sketches of one closed window record may take (see
#: :func:`window_sketches`); they come out of the series budget
#: (:data:`genmon.streams.segment_cap.SERIES_BUDGET_BYTES`), so the record's bound holds.
SKETCH_BUDGET_BYTES = 64 * 1024


class SeriesKey(NamedTuple):
    model_id: str
    model_version: str
    segment: str


class PaneKey(NamedTuple):
    model_id: str
    model_version: str
    segment: str
    pane_start_ms: int


def segments_of(attributes: dict[str, str]) -> list[str]:
    """``["*", "k1=v1", ...]``: the segment series one event belongs to."""
    return [ALL_SEGMENTS, *(f"{k}={v}" for k, v in sorted(attributes.items()))]


def event_time_ms(event: InferenceEvent) -> int:
    """When an inference counts: when it completed, ``started_at`` plus its latency.

    LLM calls take seconds to minutes and services log them when they finish, so windows
    by start time would miss every call slower than the allowed lateness (the slow ones a
    latency detector must see); by completion they arrive in order, as metrics do.
    Integer milliseconds on both paths (the native decoder adds the same truncated latency).
    """
    return int(event.started_at.timestamp() * 1000) + int(event.latency_ms)


class _Summary:
    """Count, sum and max of a non-negative quantity (token counts, lengths)."""

    __slots__ = ("max", "n", "sum")

    def __init__(self, n: int = 0, total: float = 0.0, top: float = 0.0) -> None:
        self.n, self.sum, self.max = n, total, top

    def add(self, value: float) -> None:
        self.n += 1
        self.sum += value
        if value > self.max:
            self.max = value

    def merge(self, other: _Summary) -> None:
        self.n += other.n
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def to_state(self) -> list[float]:
        return [self.n, self.sum, self.max]

    @classmethod
    def from_state(cls, state: list[float]) -> _Summary:
        return cls(int(state[0]), float(state[1]), float(state[2]))

    def summary(self) -> dict[str, float | int | None]:
        return {
            "n": self.n,
            "sum": self.sum,
            "mean": self.sum / self.n if self.n else None,
            "max": self.max if self.n else None,
        }


def tpot_ms(event: InferenceEvent) -> float | None:
    """Time per output token after the first, or None where it is not measured.

    Errors are left out (their timing says nothing about decoding speed), and so are
    events without a time to first token, with fewer than two completion tokens or with a
    first token after the end. The native path (``streams/native-rs``) computes the same
    float expression, so both add bit-identical values.
    """
    ttft, tokens = event.time_to_first_token_ms, event.completion_tokens
    if event.status in ERROR_STATUSES or ttft is None or tokens is None or tokens < 2:
        return None
    if event.latency_ms < ttft:
        return None
    return (event.latency_ms - ttft) / (tokens - 1)


def _segment_label(attributes: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(attributes.items()))


def _keep_flagged(
    exemplars: Exemplars, event: InferenceEvent, empty: bool, truncated: bool, refusal: bool
) -> None:
    """Offer ``event`` as an example of each signal it counts in; an error counts as an error
    only (its empty or refusing answer is not one more incident), as in the counts."""
    label = _segment_label(event.segment)
    code = event.error_code or ""
    error = event.status in ERROR_STATUSES
    for signal, flagged, note in (
        ("error", error, code or event.status.value),
        ("refusal", refusal and not error, code),
        ("empty", empty and not error, code),
        ("truncated", truncated, code),
    ):
        if flagged:
            exemplars.offer(
                signal,
                event.request_id,
                event.prompt,
                event.response,
                label,
                note,
                event.subject_id,
            )


class WindowStats:
    """Mergeable statistics of one series over one pane or window."""

    __slots__ = (
        "_latencies",
        "_tpots",
        "_ttfts",
        "by_error_code",
        "by_status",
        "completion_tokens",
        "empty",
        "errors",
        "exemplars",
        "fb_negative",
        "fb_positive",
        "fb_score",
        "feedback",
        "languages",
        "latency",
        "offsets",
        "prompt_tokens",
        "refusal",
        "requests",
        "response_chars",
        "tpot",
        "truncated",
        "ttft",
    )

    def __init__(
        self,
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        exemplars: int = 0,
        redact_exemplars: bool = True,
    ) -> None:
        """``exemplars``: affected examples kept per signal (0: none), their texts redacted
        with ``redact_exemplars``, see :mod:`genmon.streams.exemplars`."""
        self.requests = 0
        self.errors = 0
        self.by_status: dict[str, int] = {}
        self.by_error_code: dict[str, int] = {}
        self.latency = QuantileSketch(relative_accuracy)
        self.ttft = QuantileSketch(relative_accuracy)
        #: Time per output token (:func:`tpot_ms`).
        self.tpot = QuantileSketch(relative_accuracy)
        self.prompt_tokens = _Summary()
        self.completion_tokens = _Summary()
        self.response_chars = _Summary()
        self.empty = 0
        self.truncated = 0
        self.refusal = 0
        self.languages: dict[str, int] = {}
        self.feedback = 0
        self.fb_positive = 0
        self.fb_negative = 0
        self.fb_score = _Summary()
        #: Highest source offset applied per topic: a redelivered event at or below it was
        #: already counted in this pane (the pane and its offsets are written as one record).
        self.offsets: dict[str, int] = {}
        self.exemplars = Exemplars(exemplars, redact_exemplars) if exemplars > 0 else None
        # Per-batch buffers, flushed into the sketches in one vectorised call.
        self._latencies: list[float] = []
        self._ttfts: list[float] = []
        self._tpots: list[float] = []

    # -- building -------------------------------------------------------------------
    def add_inference(
        self,
        event: InferenceEvent,
        empty: bool,
        truncated: bool,
        refusal: bool,
        chars: int,
        language: str,
    ) -> None:
        """Count one event; ``empty`` and ``refusal`` count among answered (non-error)
        requests only, so an error burst is not also an empty-answer burst."""
        self.requests += 1
        status = event.status.value
        self.by_status[status] = self.by_status.get(status, 0) + 1
        error = event.status in ERROR_STATUSES
        if error:
            self.errors += 1
            empty = refusal = False
        if event.error_code is not None:
            code = event.error_code
            self.by_error_code[code] = self.by_error_code.get(code, 0) + 1
        self._latencies.append(event.latency_ms)
        if event.time_to_first_token_ms is not None:
            self._ttfts.append(event.time_to_first_token_ms)
        tpot = tpot_ms(event)
        if tpot is not None:
            self._tpots.append(tpot)
        if event.prompt_tokens is not None:
            self.prompt_tokens.add(event.prompt_tokens)
        if event.completion_tokens is not None:
            self.completion_tokens.add(event.completion_tokens)
        self.response_chars.add(chars)
        self.empty += empty
        self.truncated += truncated
        self.refusal += refusal
        self.languages[language] = self.languages.get(language, 0) + 1
        if self.exemplars is not None and (empty or truncated or refusal or error):
            _keep_flagged(self.exemplars, event, empty, truncated, refusal)

    def add_negative_example(
        self,
        request_id: str,
        prompt: str,
        response: str,
        segment: dict[str, str],
        note: str,
        subject_id: str | None = None,
    ) -> None:
        """Keep a negatively scored joined pair as a ``negative_feedback`` example."""
        if self.exemplars is not None:
            label = _segment_label(segment)
            self.exemplars.offer(
                "negative_feedback", request_id, prompt, response, label, note, subject_id
            )

    def add_feedback(self, score: float | None, negative_below: float) -> None:
        self.feedback += 1
        if score is None:
            return
        self.fb_score.add(score)
        if score < negative_below:
            self.fb_negative += 1
        else:
            self.fb_positive += 1

    def flush(self) -> WindowStats:
        if self._latencies:
            self.latency.add_many(self._latencies)
            self._latencies = []
        if self._ttfts:
            self.ttft.add_many(self._ttfts)
            self._ttfts = []
        if self._tpots:
            self.tpot.add_many(self._tpots)
            self._tpots = []
        return self

    def merge(self, other: WindowStats) -> WindowStats:
        other.flush()
        self.flush()
        self.requests += other.requests
        self.errors += other.errors
        add_counts(self.by_status, other.by_status)
        add_counts(self.by_error_code, other.by_error_code)
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)
        self.tpot.merge(other.tpot)
        self.prompt_tokens.merge(other.prompt_tokens)
        self.completion_tokens.merge(other.completion_tokens)
        self.response_chars.merge(other.response_chars)
        self.empty += other.empty
        self.truncated += other.truncated
        self.refusal += other.refusal
        add_counts(self.languages, other.languages)
        self.feedback += other.feedback
        self.fb_positive += other.fb_positive
        self.fb_negative += other.fb_negative
        self.fb_score.merge(other.fb_score)
        for topic, offset in other.offsets.items():
            self.offsets[topic] = max(offset, self.offsets.get(topic, -1))
        if self.exemplars is not None:
            self.exemplars.merge(other.exemplars)
        return self

    def saw(self, topic: str, offset: int | None) -> None:
        if offset is not None and offset > self.offsets.get(topic, -1):
            self.offsets[topic] = offset

    # -- (de)serialising --------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """A snapshot sharing no container with this object, which may live on and change
        (a buffered core's live pane) before a store serialises the snapshot."""
        self.flush()
        state: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "by_status": dict(self.by_status),
            "by_error_code": dict(self.by_error_code),
            "latency": self.latency.to_state(),
            "ttft": self.ttft.to_state(),
            "tpot": self.tpot.to_state(),
            "prompt_tokens": self.prompt_tokens.to_state(),
            "completion_tokens": self.completion_tokens.to_state(),
            "response_chars": self.response_chars.to_state(),
            "empty": self.empty,
            "truncated": self.truncated,
            "refusal": self.refusal,
            "languages": dict(self.languages),
            "feedback": [self.feedback, self.fb_positive, self.fb_negative],
            "fb_score": self.fb_score.to_state(),
            "off": dict(self.offsets),
        }
        if self.exemplars:
            state["ex"] = self.exemplars.to_state()
        return state

    @classmethod
    def from_state(
        cls, state: dict[str, Any], exemplars: int = 0, redact_exemplars: bool = True
    ) -> WindowStats:
        """Rebuild from :meth:`to_state`, keeping up to ``exemplars`` examples per signal
        (``redact_exemplars``: see :meth:`Exemplars.from_state`)."""
        stats = cls(state["latency"]["alpha"])
        stats.requests = int(state["requests"])
        stats.errors = int(state["errors"])
        stats.by_status = dict(state["by_status"])
        stats.by_error_code = dict(state["by_error_code"])
        stats.latency = QuantileSketch.from_state(state["latency"])
        stats.ttft = QuantileSketch.from_state(state["ttft"])
        if "tpot" in state:  # panes stored before TPOT have none: an empty sketch
            stats.tpot = QuantileSketch.from_state(state["tpot"])
        stats.prompt_tokens = _Summary.from_state(state["prompt_tokens"])
        stats.completion_tokens = _Summary.from_state(state["completion_tokens"])
        stats.response_chars = _Summary.from_state(state["response_chars"])
        stats.empty = int(state["empty"])
        stats.truncated = int(state["truncated"])
        stats.refusal = int(state["refusal"])
        stats.languages = dict(state["languages"])
        stats.feedback, stats.fb_positive, stats.fb_negative = map(int, state["feedback"])
        stats.fb_score = _Summary.from_state(state["fb_score"])
        stats.offsets = dict(state.get("off", {}))
        if exemplars > 0:
            stats.exemplars = Exemplars.from_state(exemplars, state.get("ex", {}), redact_exemplars)
        return stats

    def sketch_states(self) -> dict[str, dict[str, Any]]:
        """The raw timing sketches (:meth:`QuantileSketch.to_state`), for consumers that
        compare whole distributions (the detector runner's latency baseline), not only the
        quantiles of :meth:`summary`."""
        self.flush()
        return {
            "latency_ms": self.latency.to_state(),
            "ttft_ms": self.ttft.to_state(),
            "tpot_ms": self.tpot.to_state(),
        }

    def summary(self) -> dict[str, Any]:
        """What goes downstream for a closed window: counts, rates, quantiles.

        ``empty_rate`` and ``refusal_rate`` are over ``answered`` (non-error) requests, the
        only ones counted in ``empty`` and ``refusal``.
        """
        self.flush()
        n = self.requests
        answered = n - self.errors

        def rate(count: int, of: int = n) -> float | None:
            return count / of if of else None

        scored = self.fb_score.n
        return {
            "requests": n,
            "errors": self.errors,
            "error_rate": rate(self.errors),
            "answered": answered,
            "by_status": dict(self.by_status),
            "by_error_code": dict(self.by_error_code),
            "latency_ms": {
                **self.latency.quantiles(QUANTILES),
                "mean": self.latency.mean,
                "max": self.latency.max if self.latency.count else None,
            },
            "ttft_ms": {**self.ttft.quantiles(QUANTILES), "n": self.ttft.count},
            "tpot_ms": {**self.tpot.quantiles(QUANTILES), "n": self.tpot.count},
            "prompt_tokens": self.prompt_tokens.summary(),
            "completion_tokens": self.completion_tokens.summary(),
            "response_chars": self.response_chars.summary(),
            "empty": self.empty,
            "empty_rate": rate(self.empty, answered),
            "truncated": self.truncated,
            "truncated_rate": rate(self.truncated),
            "refusal": self.refusal,
            "refusal_rate": rate(self.refusal, answered),
            "languages": dict(self.languages),
            "sketch_relative_accuracy": self.latency.relative_accuracy,
            "feedback": {
                "n": self.feedback,
                "positive": self.fb_positive,
                "negative": self.fb_negative,
                "negative_rate": self.fb_negative / scored if scored else None,
                "mean_score": self.fb_score.sum / scored if scored else None,
            },
        }


def aggregate_inferences(
    events: Iterable[tuple[int | None, InferenceEvent]],
    pane_ms: int,
    quality: QualitySignals,
    relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
    applied: Callable[[PaneKey], int] | None = None,
    exemplars: int = 0,
    segment_cap: SegmentCap | None = None,
    redact_exemplars: bool = True,
) -> dict[PaneKey, WindowStats]:
    """Aggregate a whole batch in memory: one :class:`WindowStats` per touched pane key.

    ``events`` are ``(source offset or None, event)``; ``applied(key)`` is the highest
    inference offset the stored pane already holds, so redelivered events are not counted
    twice in it. Up to ``exemplars`` flagged examples per signal are kept in the ``"*"``
    series (the quality detectors judge whole versions), their texts redacted with
    ``redact_exemplars``. With a ``segment_cap`` its
    refused attribute values count in their attribute's overflow series.
    """
    # Each event is added once, to the group of events sharing its model, version, pane and
    # the segment series it still counts in; each series' pane is then the merge of its
    # groups (a few dozen merges per batch instead of one add per event and series).
    # Groups are keyed by the attributes themselves (not only the segments they count in),
    # as the native path (genmon.streams.native) groups, so both add the same floats in the
    # same order.
    groups: dict[_GroupKey, WindowStats] = {}
    done_by_group: dict[_GroupKey, tuple[int, ...]] = {}
    segment_cache: dict[tuple[tuple[str, str], ...], tuple[str, ...]] = {}
    for offset, event in events:
        t = event_time_ms(event)
        pane = t - t % pane_ms
        model, version = event.model_id, event.model_version
        attributes = tuple(sorted(event.segment.items()))
        if segment_cap is not None:
            segments = segment_cap.segments(model, event.segment)
        else:
            segments = segment_cache.get(attributes)
            if segments is None:
                segments = segment_cache[attributes] = tuple(segments_of(event.segment))
        group_key = (model, version, pane, attributes, segments)
        if offset is not None and applied is not None:
            done = done_by_group.get(group_key)
            if done is None:
                done = done_by_group[group_key] = tuple(
                    applied(PaneKey(model, version, segment, pane)) for segment in segments
                )
            if offset <= max(done):
                kept = tuple(s for s, d in zip(segments, done, strict=True) if offset > d)
                if not kept:
                    continue
                group_key = (model, version, pane, attributes, kept)
        stats = groups.get(group_key)
        if stats is None:
            stats = groups[group_key] = WindowStats(relative_accuracy, exemplars, redact_exemplars)
        sig = quality.of(event)
        stats.add_inference(
            event, sig.empty, sig.truncated, sig.refusal, sig.response_chars, sig.language
        )
        stats.saw("inference", offset)
    out: dict[PaneKey, WindowStats] = {}
    for (model, version, pane, _, segments), stats in groups.items():
        merge_group(out, model, version, pane, segments, stats, exemplars, redact_exemplars)
    return out


def merge_group(
    out: dict[PaneKey, WindowStats],
    model: str,
    version: str,
    pane: int,
    segments: Iterable[str],
    stats: WindowStats,
    exemplars: int,
    redact_exemplars: bool,
) -> None:
    """Merge one group's statistics into the pane of each segment series it counts in.

    Examples are kept in the ``"*"`` series only (the quality detectors judge versions).
    """
    for segment in segments:
        key = PaneKey(model, version, segment, pane)
        into = out.get(key)
        if into is None and segment == ALL_SEGMENTS:
            # The group's own statistics become the pane's (it keeps examples as "*" does):
            # one merge less per group. The caller never reads the group again.
            out[key] = stats
            continue
        if into is None:
            into = out[key] = WindowStats(stats.latency.relative_accuracy, 0, redact_exemplars)
        into.merge(stats)


_GroupKey = tuple[str, str, int, tuple[tuple[str, str], ...], tuple[str, ...]]


def window_sketches(
    series: dict[tuple[str, str], WindowStats], budget: int = SKETCH_BUDGET_BYTES
) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """The :meth:`WindowStats.sketch_states` of each version's ``"*"`` series in ``series``
    (``(version, segment) -> stats`` of one window), and the bytes they take as JSON.

    A sketch holds a few hundred buckets for realistic timings, but values spread over many
    orders of magnitude make it longer: the busiest versions get theirs while they fit
    ``budget``, the others none (their quantiles are still in the summary).
    """
    busiest_first = sorted(
        (-stats.requests, version)
        for (version, segment), stats in series.items()
        if segment == ALL_SEGMENTS
    )
    out: dict[str, dict[str, dict[str, Any]]] = {}
    used = 0
    for _, version in busiest_first:
        states = series[(version, ALL_SEGMENTS)].sketch_states()
        size = len(json.dumps(states)) + len(', "sketches": ')
        if used + size <= budget:
            out[version] = states
            used += size
    return out, used


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window family: tumbling when ``step_ms == size_ms``."""

    kind: str
    size_ms: int
    step_ms: int

    def windows_containing(self, t_ms: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of every window of this family that contains instant ``t_ms``."""
        last_start = t_ms - t_ms % self.step_ms
        start = last_start
        while start > t_ms - self.size_ms:
            yield start, start + self.size_ms
            start -= self.step_ms

    def last_end_containing(self, t_ms: int) -> int:
        return t_ms - t_ms % self.step_ms + self.size_ms


class WindowPlan:
    """The window families, their common pane length and the lateness rules.

    >>> plan = WindowPlan(tumbling_s=60, hopping_size_s=300, hopping_step_s=60,
    ...                   allowed_lateness_s=10, expires_s=3600)
    >>> plan.pane_ms
    60000
    >>> sorted(plan.windows_of_pane(120_000))[:2]
    [('hopping', -120000, 180000), ('hopping', -60000, 240000)]
    """

    def __init__(
        self,
        tumbling_s: float,
        hopping_size_s: float,
        hopping_step_s: float,
        allowed_lateness_s: float,
        expires_s: float,
    ) -> None:
        sizes = {
            "tumbling_s": tumbling_s,
            "hopping_size_s": hopping_size_s,
            "hopping_step_s": hopping_step_s,
        }
        for name, value in sizes.items():
            if value <= 0 or abs(value * 1000 - round(value * 1000)) > 1e-6:
                raise ValueError(
                    f"windows.{name}={value} must be a positive whole number of milliseconds"
                )
        if hopping_size_s < hopping_step_s:
            raise ValueError(
                f"windows.hopping_size_s={hopping_size_s} must be >= "
                f"windows.hopping_step_s={hopping_step_s}"
            )
        if allowed_lateness_s < 0:
            raise ValueError(f"windows.allowed_lateness_s={allowed_lateness_s} must be >= 0")
        tumbling = round(tumbling_s * 1000)
        hop_size, hop_step = round(hopping_size_s * 1000), round(hopping_step_s * 1000)
        self.specs = (
            WindowSpec("tumbling", tumbling, tumbling),
            WindowSpec("hopping", hop_size, hop_step),
        )
        self.pane_ms = math.gcd(tumbling, hop_size, hop_step)
        self.lateness_ms = round(allowed_lateness_s * 1000)
        longest = max(tumbling, hop_size) + self.lateness_ms
        self.longest_ms = longest
        if expires_s * 1000 < longest:
            raise ValueError(
                f"windows.expires_s={expires_s} must cover the longest window plus the allowed "
                f"lateness ({longest / 1000:g} s), or windows would expire before they close"
            )
        self.expires_ms = round(expires_s * 1000)

    def windows_of_pane(self, pane_start: int) -> Iterator[tuple[str, int, int]]:
        for spec in self.specs:
            for start, end in spec.windows_containing(pane_start):
                yield spec.kind, start, end

    def pane_done(self, pane_start: int, watermark_ms: int) -> bool:
        """True when every window the pane belongs to has closed (or the pane expired)."""
        last_end = max(spec.last_end_containing(pane_start) for spec in self.specs)
        return (
            last_end + self.lateness_ms <= watermark_ms
            or pane_start + self.expires_ms <= watermark_ms
        )

    def closable(self, end_ms: int, watermark_ms: int) -> bool:
        return end_ms + self.lateness_ms <= watermark_ms
