"""The fixed thresholds genmon shipped before "Trustworthy alerts (1 of 2)" (c1f8cbf).

From ``git show c1f8cbf^:genmon/settings.py`` and ``c1f8cbf^:streams/runner.py``: per
60 s tumbling window of a model version (``"*"`` segment), judged only with at least
``min_window_requests`` (10) requests:

- ``latency_p99``: end-to-end latency p99 above ``windows.slow_latency_ms`` = 2,000 ms;
- ``error_rate``: errors / requests above ``detectors.error_rate_max`` = 5 %;
- ``refusal_rate``: refusals / requests above ``detectors.refusal_rate_max`` = 20 %;
- ``empty_rate``: empty responses / requests above ``detectors.empty_rate_max`` = 5 %
  (the old aggregates counted a failed request's empty answer as empty too).

The old runner also ran an EWMA z-score on the windows' p99 (not a fixed threshold; left
out here) and an embedding drift detector (no fixed threshold either: this configuration
has nothing for a topic switch). The windows are computed from the requests (exact p99,
where the old worker used a DDSketch of 1 % relative accuracy); an alarm is raised when
the window closes, ``allowed_lateness_s`` (10 s) after its end, the earliest the old
worker could judge it.
"""

from __future__ import annotations

import numpy as np

from bench.detection.table import Table

WINDOW_S = 60.0
LATENESS_S = 10.0
MIN_REQUESTS = 10
THRESHOLDS = {
    "latency_p99": 2000.0,
    "error_rate": 0.05,
    "refusal_rate": 0.20,
    "empty_rate": 0.05,
}


def alarms(table: Table) -> dict[str, list[float]]:
    """Alarm times per signal: the close time of every window over its threshold."""
    window = np.floor(table.started / WINDOW_S).astype(np.int64)
    order = np.argsort(window, kind="stable")
    keys, starts, counts = np.unique(window[order], return_index=True, return_counts=True)
    out: dict[str, list[float]] = {name: [] for name in THRESHOLDS}
    for key, begin, n in zip(keys.tolist(), starts.tolist(), counts.tolist(), strict=True):
        if n < MIN_REQUESTS:
            continue
        rows = order[begin : begin + n]
        values = {
            "latency_p99": float(np.quantile(table.latency_ms[rows], 0.99)),
            "error_rate": float(table.error[rows].mean()),
            "refusal_rate": float(table.refusal[rows].mean()),
            "empty_rate": float(table.empty[rows].mean()),
        }
        closes = (key + 1) * WINDOW_S + LATENESS_S
        for name, value in values.items():
            if value > THRESHOLDS[name]:
                out[name].append(closes)
    return {name: times for name, times in out.items() if times}
