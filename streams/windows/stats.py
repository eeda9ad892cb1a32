"""Mergeable statistics of one series over one pane or window (:class:`WindowStats`).

Counts, sums, maxima and DDSketch quantile sketches only, so a window's statistics are
exactly the merge of its panes' (:mod:`genmon.streams.windows.plan`), and a pane
serialises to a plain dict for the state store (:meth:`WindowStats.to_state`). Flagged
events are offered as examples (:mod:`genmon.streams.windows.exemplars`) as they are
counted. The native path (:mod:`genmon.streams.native`) fills the same objects.
"""

from __future__ import annotations

from typing import Any

from genmon.detectors.sketch import DEFAULT_RELATIVE_ACCURACY, QuantileSketch, add_counts
from genmon.schemas.events import InferenceEvent, InferenceStatus
from genmon.streams.windows.exemplars import Exemplars

#: Quantiles reported for latency, time to first token and time per output token.
QUANTILES = (0.5, 0.9, 0.95, 0.99)
#: Statuses counted as errors; truncated and content-filtered answers are quality signals,
#: cancelled requests are the client's choice. ``by_status`` keeps every status anyway.
ERROR_STATUSES = frozenset({InferenceStatus.ERROR, InferenceStatus.TIMEOUT})


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
        with ``redact_exemplars``, see :mod:`genmon.streams.windows.exemplars`."""
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
