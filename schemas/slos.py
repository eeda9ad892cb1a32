"""Service-level objectives a user writes per model: absolute limits, never a default.

``detectors.slos`` maps a model id (or ``*`` for every model) to objectives such as
``"ttft_p95 <= 1.5s"`` or ``"error_rate <= 2%"``. Each tumbling window of each version
with at least ``detectors.min_window_requests`` requests is checked; a breach pages
(detector ``slo``) whatever the learned baseline says, and is outside the false-alarm
budget: the user chose the limit.

>>> slo = parse_slo("ttft_p95 <= 1.5s")
>>> slo.metric, slo.limit, slo.breached({"ttft_ms": {"p95": 2400.0}})
('ttft_p95', 1500.0, True)
>>> parse_slo("error_rate <= 2%").limit
0.02
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from genmon.exceptions import ConfigurationError
from genmon.schemas.events import FindingKind

_LATENCIES = {"latency": "latency_ms", "ttft": "ttft_ms", "tpot": "tpot_ms"}
_QUANTILES = ("p50", "p90", "p95", "p99")
_RATES = {
    "error_rate": ("error_rate", FindingKind.ANOMALY),
    "refusal_rate": ("refusal_rate", FindingKind.QUALITY),
    "empty_rate": ("empty_rate", FindingKind.QUALITY),
    "negative_feedback_rate": ("negative_rate", FindingKind.QUALITY),
}
_SYNTAX = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<)\s*([0-9.]+)\s*(ms|s|%)?\s*$")


@dataclass(frozen=True)
class SLO:
    """One objective: ``metric`` of a version's window stays at or below ``limit``."""

    metric: str
    limit: float
    """Milliseconds for latencies, a fraction for rates."""
    text: str

    @property
    def kind(self) -> FindingKind:
        return _RATES[self.metric][1] if self.metric in _RATES else FindingKind.ANOMALY

    @property
    def is_latency(self) -> bool:
        return self.metric not in _RATES

    @property
    def rate_signal(self) -> str | None:
        """The default signal counting what a rate objective counts (whose affected
        examples a breach shows), None for a latency."""
        if self.metric not in _RATES:
            return None
        return "negative_feedback" if self.metric == "negative_feedback_rate" else self.metric

    def value(self, series: dict[str, Any]) -> float | None:
        """The metric in a window series summary (None when the window has no value)."""
        if self.metric in _RATES:
            name = _RATES[self.metric][0]
            source = series.get("feedback", {}) if name == "negative_rate" else series
            value = source.get(name)
        else:
            family, quantile = self.metric.split("_")
            value = series.get(_LATENCIES[family], {}).get(quantile)
        return None if value is None else float(value)

    def breached(self, series: dict[str, Any]) -> bool:
        value = self.value(series)
        return value is not None and value > self.limit


def parse_slo(text: str) -> SLO:
    """Read ``"<metric> <= <limit>[ms|s|%]"``; a clear error says what is accepted."""
    match = _SYNTAX.match(text)
    metrics = sorted([*_RATES, *(f"{f}_{q}" for f in _LATENCIES for q in _QUANTILES)])
    if match is None:
        raise ConfigurationError(
            f"SLO {text!r} is not '<metric> <= <limit>', e.g. 'ttft_p95 <= 1.5s' or"
            f" 'error_rate <= 2%'; metrics: {', '.join(metrics)}"
        )
    metric, _, number, unit = match.groups()
    if metric not in metrics:
        raise ConfigurationError(
            f"SLO {text!r}: unknown metric {metric!r}; choose one of {metrics}"
        )
    limit = float(number)
    if metric in _RATES:
        if unit in ("ms", "s"):
            raise ConfigurationError(f"SLO {text!r}: a rate takes a fraction or a %, not {unit}")
        limit = limit / 100.0 if unit == "%" else limit
    else:
        if unit == "%":
            raise ConfigurationError(f"SLO {text!r}: a latency takes ms or s, not %")
        limit = limit * 1000.0 if unit == "s" else limit
    return SLO(metric, limit, text.strip())


def slos_for(configured: dict[str, list[str]], model_id: str) -> list[SLO]:
    """The objectives of ``model_id``: its own and those written for ``*``."""
    texts = [*configured.get("*", []), *configured.get(model_id, [])]
    return [parse_slo(text) for text in texts]
