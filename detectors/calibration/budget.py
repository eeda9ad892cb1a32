"""The false-alarm budget: how often a healthy model may page, stated in time and shared out.

One setting, ``detectors.false_pages_per_week`` (default 1), says how many pages a model
with nothing wrong may cost on-call in a week. Each default detector gets a fixed share of
it (:data:`SHARES`), so its own allowance is a time between false alarms::

    ARL (windows) = windows per week / (false_pages_per_week * share)

and every test is calibrated to that, in windows of traffic, never in samples:

- the sequential rate tests (:class:`~genmon.detectors.RateCUSUM`: errors, refusals,
  empty answers, negative feedback, and the share of requests above the baseline's
  latency quantile) alarm when their CUSUM passes ``log(2 x ARL x series)``, or when one
  window alone has a p-value under ``1 / (2 x ARL x series)``: a CUSUM's in-control run
  length is at least ``exp(threshold)`` windows (Wald), so each of the ``series`` it runs
  at once (versions, segments) may spend ``1/series`` of the share (Bonferroni), half on
  each part, however often it looks;
- the embedding drift test (:class:`~genmon.detectors.EmbeddingShiftDrift`) is one
  independent test per window with false-alarm probability ``1 / (ARL x series)``.

A test that fires opens an incident: one page. Its share is an upper bound in both cases
(the Wald bound is conservative), so a healthy model pages at most
``false_pages_per_week`` times a week in expectation, however many versions, segments and
windows it has. ``genmon detectors list`` prints the table in users' units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from genmon.schemas.events import FindingKind
from genmon.settings import Settings

SECONDS_PER_WEEK = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Share:
    """One default detector's part of the budget."""

    signal: str
    share: float
    kind: FindingKind
    test: str
    what: str


#: Every default detector's share of ``detectors.false_pages_per_week`` (they sum to 1).
SHARES: tuple[Share, ...] = (
    Share(
        "ttft",
        0.1,
        FindingKind.ANOMALY,
        "rate_cusum",
        "requests whose time to first token is above the baseline's quantile",
    ),
    Share(
        "tpot",
        0.1,
        FindingKind.ANOMALY,
        "rate_cusum",
        "requests whose time per output token is above the baseline's quantile",
    ),
    Share(
        "latency",
        0.1,
        FindingKind.ANOMALY,
        "rate_cusum",
        "requests whose end-to-end latency is above the baseline's quantile (secondary:"
        " not paged when TTFT or TPOT explain it)",
    ),
    Share("error_rate", 0.1, FindingKind.ANOMALY, "rate_cusum", "failed requests"),
    Share("refusal_rate", 0.1, FindingKind.QUALITY, "rate_cusum", "refusals among answers"),
    Share("empty_rate", 0.1, FindingKind.QUALITY, "rate_cusum", "empty answers"),
    Share(
        "negative_feedback",
        0.2,
        FindingKind.QUALITY,
        "rate_cusum",
        "negative feedback, per version and per segment (each segment against its own baseline)",
    ),
    Share(
        "embedding_prompt",
        0.1,
        FindingKind.DRIFT,
        "embedding_shift",
        "prompts' sampled embeddings against their reference",
    ),
    Share(
        "embedding_response",
        0.1,
        FindingKind.DRIFT,
        "embedding_shift",
        "answers' sampled embeddings against their reference",
    ),
)
_BY_SIGNAL = {share.signal: share for share in SHARES}


def share_of(signal: str) -> Share:
    """The budget share of a default signal (``KeyError`` for one that has none)."""
    return _BY_SIGNAL[signal]


class Budget:
    """The budget of one configuration, in windows and in users' units."""

    def __init__(self, settings: Settings) -> None:
        self.pages_per_week = settings.detectors.false_pages_per_week
        self.window_s = settings.windows.tumbling_s
        self.windows_per_week = SECONDS_PER_WEEK / self.window_s

    def pages_per_week_of(self, signal: str) -> float:
        """False pages per model-week the signal's detector may cost."""
        return self.pages_per_week * share_of(signal).share

    def arl_windows(self, signal: str) -> float:
        """Windows between false alarms the signal's detector is allowed, at least."""
        return self.windows_per_week / self.pages_per_week_of(signal)

    def rate_test(self, signal: str, series: int) -> tuple[float, float]:
        """``(CUSUM threshold, per-window alpha)`` of a rate test that is one of ``series``
        sharing the signal's allowance: each half of it (their expected false alarms per
        window add up to at most ``1 / (ARL x series)``)."""
        windows = 2.0 * self.arl_windows(signal) * max(series, 1)
        return math.log(windows), 1.0 / windows

    def window_alpha(self, signal: str, series: int) -> float:
        """False-alarm probability per window of a test that is one of ``series``."""
        return 1.0 / (self.arl_windows(signal) * max(series, 1))

    def table(self) -> list[dict[str, object]]:
        """One row per default detector, in users' units (``genmon detectors list``)."""
        rows: list[dict[str, object]] = []
        for share in SHARES:
            arl = self.arl_windows(share.signal)
            rows.append(
                {
                    "signal": share.signal,
                    "kind": share.kind.value,
                    "test": share.test,
                    "share": share.share,
                    "false_pages_per_model_week": self.pages_per_week_of(share.signal),
                    "hours_between_false_pages": arl * self.window_s / 3600.0,
                    "arl_windows": arl,
                    "what": share.what,
                }
            )
        return rows
