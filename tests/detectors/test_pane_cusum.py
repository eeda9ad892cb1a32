"""PaneCUSUM: parallel CUSUMs designed for large rises, fed short panes of requests.

A seeded stream of one-second panes with a known change point: healthy at the baseline,
then most requests fail. The charts page a few requests after the change, where one
CUSUM designed for a doubling needs several times more; on the healthy part they stay
quiet, and their false alarms stay within ``k x panes x exp(-threshold)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from genmon.detectors.anomaly.pane_cusum import DEFAULT_ODDS_RATIOS, PaneCUSUM
from genmon.detectors.exceptions import InputError, InvalidParameterError

BASELINE = 0.005
THRESHOLD = math.log(2 * 1e4) + math.log(2 * len(DEFAULT_ODDS_RATIOS) * 60)


def requests_to_alarm(charts: PaneCUSUM, rng: np.random.Generator, share: float) -> int:
    """Panes of 3 requests, ``share`` of them failing, until the charts cross."""
    for pane in range(1, 200):
        if charts.update(int(rng.binomial(3, share)), 3, BASELINE).crossed:
            return 3 * pane
    return 600


def test_most_requests_failing_page_within_a_few_requests_after_the_change() -> None:
    rng = np.random.default_rng(11)
    charts = PaneCUSUM(THRESHOLD)
    for _ in range(3600):  # an hour of healthy panes: quiet
        assert not charts.update(int(rng.binomial(3, BASELINE)), 3, BASELINE).crossed
    charts.reset()
    assert requests_to_alarm(charts, np.random.default_rng(1), 0.87) <= 9
    # Designed for a doubling only, the same threshold takes several times longer.
    doubling = PaneCUSUM(THRESHOLD, odds_ratios=(2.0,), min_increase=0.01)
    assert requests_to_alarm(doubling, np.random.default_rng(1), 0.87) >= 15


def test_the_chart_designed_nearest_the_rise_crosses() -> None:
    charts = PaneCUSUM(THRESHOLD)
    result = charts.update(9, 10, BASELINE)
    for _ in range(3):
        result = charts.update(9, 10, BASELINE)
    assert result.crossed and result.chart == len(DEFAULT_ODDS_RATIOS) - 1
    assert result.design_rate > 0.2
    charts.reset()
    assert charts.sums == [0.0] * len(DEFAULT_ODDS_RATIOS)


def test_null_alarms_stay_within_the_run_length_bound() -> None:
    """Binomial panes at the baseline: alarms per pane at most ``k exp(-threshold)``."""
    rng = np.random.default_rng(3)
    threshold, panes = 6.0, 200_000
    charts, alarms = PaneCUSUM(threshold), 0
    for x in rng.binomial(20, 0.05, panes):
        if charts.update(int(x), 20, 0.05).crossed:
            alarms += 1
            charts.reset()
    assert alarms <= len(DEFAULT_ODDS_RATIOS) * panes * math.exp(-threshold)


def test_overdispersed_panes_add_less_evidence() -> None:
    binomial, correlated = PaneCUSUM(THRESHOLD), PaneCUSUM(THRESHOLD)
    binomial.update(5, 20, BASELINE)
    correlated.update(5, 20, BASELINE, rho=0.05)
    assert 0 < correlated.sums[-1] < binomial.sums[-1]


@pytest.mark.parametrize(
    ("kwargs", "update"),
    [
        ({"threshold": 0.0}, None),
        ({"threshold": 5.0, "odds_ratios": (1.0,)}, None),
        ({"threshold": 5.0}, (3, 2)),
    ],
)
def test_bad_parameters_and_panes_are_refused(kwargs: dict, update: tuple | None) -> None:
    with pytest.raises(InputError if update else InvalidParameterError):
        PaneCUSUM(**kwargs).update(*(update or (0, 1)), BASELINE)
