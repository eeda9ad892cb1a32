"""Early detection: the rate and latency tests look at the open tumbling window every
``detectors.early_interval_s``, so an abrupt change pages seconds after it starts, not
after the window closes, within the same false-alarm budget.

The window state on a dict store builds the open window's record
(:meth:`WindowState.open_windows`); the runner judges it (:meth:`DetectorRunner.peek`).
The same path inside the worker on the real broker is in ``test_early_detection_kafka.py``
and on real traffic in ``tests/replay/test_replay.py``.
"""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime, timedelta

import numpy as np

from genmon.detectors import RateCUSUM, RateWindow
from genmon.detectors.anomaly.pane_cusum import DEFAULT_ODDS_RATIOS, PaneCUSUM
from genmon.schemas.events import InferenceEvent, InferenceStatus
from genmon.settings import Settings
from genmon.streams.detection.early import SPLIT
from genmon.streams.detection.runner import DetectorRunner
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import DictStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW_S = 60
PER_WINDOW = 300


def settings(**detectors: object) -> Settings:
    return Settings(
        windows={"tumbling_s": WINDOW_S, "hopping_size_s": 120, "hopping_step_s": 60},
        detectors={"baseline_warmup_windows": 4, "exemplars_per_window": 0, **detectors},
        embedding={"enabled": False},
    )


def event(i: int, t_s: float, failed: bool) -> InferenceEvent:
    return InferenceEvent(
        request_id=f"r{i}",
        model_id="chat",
        latency_ms=100.0,
        response="" if failed else "fine",
        status=InferenceStatus.ERROR if failed else InferenceStatus.OK,
        started_at=T0 + timedelta(seconds=t_s),
    )


class Model:
    """One model's window state and detector state, fed second by second."""

    def __init__(self, config: Settings) -> None:
        self.core = WindowState(config, DictStore(), clock=lambda: T0.timestamp() + 86_400)
        self.runner = DetectorRunner(config)
        self.state: dict | None = None
        self.closed: list = []
        self.n = 0

    def second(self, t_s: int, per_second: int, failing: int = 0) -> list:
        """Add one second of traffic (``failing`` of ``per_second`` fail), close what is
        due, then look at the open window; return the findings of the look."""
        events = [
            (None, event(self.n + k, t_s + k / per_second, k < failing)) for k in range(per_second)
        ]
        self.n += per_second
        self.core.on_inferences(0, events)
        for window in self.core.due_windows(0):
            self.core.windows_sent(0, [window])
            self.state, findings = self.runner.on_window(self.state, window)
            self.closed += findings
        looked = []
        for window in self.core.open_windows(0):
            state, findings = self.runner.peek(self.state, window)
            if findings:
                self.state = state
            looked += findings
        return looked

    def healthy(self, seconds: range) -> None:
        for t in seconds:
            # One failure in 150 requests: 0.67 %, every window alike.
            assert self.second(t, PER_WINDOW // WINDOW_S, failing=int(t % 30 == 0)) == []


def test_an_error_burst_pages_from_the_open_window_within_seconds() -> None:
    model = Model(settings())
    model.healthy(range(0, 10 * WINDOW_S))
    burst_at = 10 * WINDOW_S + 20  # a third into the window
    model.healthy(range(10 * WINDOW_S, burst_at))
    before = copy.deepcopy(model.state)
    looked: list = []
    t = burst_at
    while not looked and t < burst_at + 30:
        looked = model.second(t, 5, failing=4)  # 80 % fail
        t += 1
    assert t - burst_at <= 5, f"paged {t - burst_at} s after the burst began"
    (finding,) = looked
    assert finding.signal == "error_rate" and finding.detected
    assert finding.evidence["early_requests"] < PER_WINDOW / 2
    assert finding.window_end == T0 + timedelta(seconds=11 * WINDOW_S)
    assert finding.title.startswith("Error rate ")
    # A look keeps nothing but the firing: the detectors and baselines are as they were.
    assert model.state is not None and before is not None
    assert model.state["baselines"] == before["baselines"]
    for key, entry in before["series"].items():
        assert model.state["series"][key]["det"] == entry["det"]

    # The same window fires early once; the close publishes it again under the same key.
    for later in range(t, 11 * WINDOW_S + 12):
        assert model.second(later, 5, failing=4) == []
    closing = [f for f in model.closed if f.signal == "error_rate" and f.detected]
    assert [f.dedup_key for f in closing] == [finding.dedup_key]


def test_a_look_is_made_only_when_the_window_changed() -> None:
    model = Model(settings())
    model.core.on_inferences(0, [(None, event(0, 1.0, False))])
    assert len(model.core.open_windows(0)) == 1
    assert model.core.open_windows(0) == []
    model.core.on_inferences(0, [(None, event(1, 2.0, False))])
    (record,) = model.core.open_windows(0)
    assert record["series"][0]["requests"] == 2
    # Asked for by name, a window comes whether it changed or not.
    assert len(model.core.open_windows(0, only=("chat", WINDOW_S * 1000 + record["start_ms"]))) == 1


def test_without_early_looks_the_burst_waits_for_the_close() -> None:
    model = Model(settings(early_interval_s=0))
    assert model.runner.early_looks == 0
    model.healthy(range(0, 10 * WINDOW_S + 20))
    for t in range(10 * WINDOW_S + 20, 11 * WINDOW_S):
        model.second(t, 5, failing=4)
    assert not [f for f in model.closed if f.detected]


def test_a_burst_in_a_trickle_pages_within_a_few_requests() -> None:
    """At one request a second, the window's own tests need a dozen failures (each adds
    ``log 2`` to a CUSUM designed for a doubling, and the window's healthy part dilutes
    its single-window test); the pane charts, designed for large rises and fed only the
    requests since the last look, page after a handful."""

    def requests_to_page(model: Model) -> int:
        for t in range(0, 10 * WINDOW_S + 20):
            model.second(t, 1, failing=int(t % 120 == 0))
        for k in range(1, 40):
            if model.second(10 * WINDOW_S + 20 + k, 1, failing=1):
                return k
        return 40

    with_panes = requests_to_page(Model(settings()))
    assert with_panes <= 8, with_panes
    without = Model(settings())
    without.runner.early._pane = lambda *args, **kwargs: None  # type: ignore[method-assign]
    w = requests_to_page(without)
    assert w >= 2 * with_panes


def test_looks_and_panes_spend_no_more_than_the_closes_allowance() -> None:
    """Null windows of 100 binomial requests at 5 %, looked at ten times each and closed:
    the alarms of looks, pane charts and closes together stay within the allowance of
    closes alone (the CUSUM's threshold bounds a crossing at any instant and its
    allowance is split with the pane charts; the per-window alpha is shared between the
    close and the looks)."""
    rng = np.random.default_rng(7)
    arl, looks, windows = 25.0, 10, 6000
    threshold, alpha = math.log(2 * arl) + SPLIT, 1 / (2 * arl)
    det = RateCUSUM(threshold=threshold, window_alpha=alpha / 2)
    charts = PaneCUSUM(threshold + math.log(len(DEFAULT_ODDS_RATIOS) * looks))
    alarms = 0
    for _ in range(windows):
        requests = rng.random(100) < 0.05
        fired = False
        for k in range(1, looks + 1):
            n, pane = 100 * k // looks, requests[100 * (k - 1) // looks : 100 * k // looks]
            peek = copy.deepcopy(det)
            peek.window_alpha = alpha / (2 * looks)
            crossed = charts.update(int(pane.sum()), len(pane), 0.05).crossed
            if not peek._firing and (
                crossed or peek.update([RateWindow(int(requests[:n].sum()), n, 0.05)]).detected
            ):
                fired = True
                break
        was_firing = det._firing
        closed = det.update([RateWindow(int(requests.sum()), 100, 0.05)]).detected
        alarms += fired or (closed and not was_firing)
        if fired:
            charts.reset()
        if fired and not closed:
            det.reset()
    allowance = windows / arl
    assert alarms <= allowance, (alarms, allowance)
