"""Unit tests of the detector runner: warm-up, baselines that belong to the model, budgeted
sequential tests, one cause one incident, titles and severities, SLOs, JSON state,
duplicate windows, clear signals, overflow series and bounded state."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pipeline_support import WINDOWS

from genmon.detectors.calibration.budget import Budget
from genmon.detectors.sketch import QuantileSketch
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import FeedbackEvent, FindingKind, InferenceEvent, Severity
from genmon.schemas.slos import parse_slo
from genmon.settings import Settings
from genmon.streams.detection.early import SPLIT
from genmon.streams.detection.runner import DetectorRunner
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import DictStore

WARMUP = 15


@dataclass
class Traffic:
    """One version's window, drawn with a seeded generator."""

    requests: int = 600
    error_rate: float = 0.005
    refusal_rate: float = 0.03
    empty_rate: float = 0.005
    ttft_ms: float = 600.0
    tpot_ms: float = 25.0
    ttft_reported: bool = True
    negative_rate: float = 0.2
    scored: int = 60
    #: segment -> (negative rate, scored); ``None``: the version's own feedback counts.
    segments: dict[str, tuple[float, int] | None] = field(default_factory=dict)


def series(rng: np.random.Generator, version: str, t: Traffic) -> list[dict]:
    n = t.requests
    errors = int(rng.binomial(n, t.error_rate))
    answered = n - errors
    ttft = rng.lognormal(math.log(t.ttft_ms), 0.3, n)
    tpot = rng.lognormal(math.log(t.tpot_ms), 0.2, n)
    tokens = rng.integers(20, 400, n)
    latency = ttft + tpot * (tokens - 1)
    sketches = {}
    for name, values in (("latency_ms", latency), ("ttft_ms", ttft), ("tpot_ms", tpot)):
        sketch = QuantileSketch()
        if name == "latency_ms" or t.ttft_reported:  # TPOT needs TTFT too
            sketch.add_many(values.tolist())
        sketches[name] = sketch.to_state()
    negative = int(rng.binomial(t.scored, t.negative_rate))
    overall = {
        "model_version": version,
        "segment": "*",
        "requests": n,
        "errors": errors,
        "answered": answered,
        "refusal": int(rng.binomial(answered, t.refusal_rate)),
        "empty": int(rng.binomial(answered, t.empty_rate)),
        "latency_ms": {"p95": float(np.quantile(latency, 0.95))},
        "ttft_ms": {
            "p95": float(np.quantile(ttft, 0.95)) if t.ttft_reported else None,
            "n": n if t.ttft_reported else 0,
        },
        "tpot_ms": {"n": n if t.ttft_reported else 0},
        "feedback": {"negative": negative, "positive": t.scored - negative},
        "sketches": sketches,
    }
    out = [overall]
    for segment, spec in sorted(t.segments.items()):
        rate, scored = spec or (0.0, t.scored)
        bad = int(rng.binomial(scored, rate)) if spec else negative
        out.append(
            {
                "model_version": version,
                "segment": segment,
                "requests": scored,
                "errors": 0,
                "answered": scored,
                "refusal": 0,
                "empty": 0,
                "feedback": {"negative": bad, "positive": scored - bad},
            }
        )
    return out


def window(minute: int, versions: dict[str, Traffic], seed: int = 0, model: str = "chat") -> dict:
    rng = np.random.default_rng(seed * 100_003 + minute)
    end = datetime(2026, 1, 5, tzinfo=UTC) + timedelta(minutes=minute)
    return {
        "model_id": model,
        "kind": "tumbling",
        "start_ms": int(end.timestamp() * 1000) - 60_000,
        "end_ms": int(end.timestamp() * 1000),
        "window_start": (end - timedelta(minutes=1)).isoformat(),
        "window_end": end.isoformat(),
        "series": [s for v, t in sorted(versions.items()) for s in series(rng, v, t)],
    }


def run(runner: DetectorRunner, minutes: range, traffic, state=None, *, as_json: bool = True):
    """Windows of ``traffic(minute) -> {version: Traffic}``; the detected findings by minute."""
    fired: dict[int, list] = {}
    for minute in minutes:
        state, findings = runner.on_window(state, window(minute, traffic(minute)))
        if as_json:
            state = json.loads(json.dumps(state))  # what the Faust table keeps
        fired[minute] = [f for f in findings if f.detected]
    return state, fired


def healthy(minute: int) -> dict[str, Traffic]:
    return {"v1": Traffic()}


def test_a_new_model_warms_up_silently_then_is_judged() -> None:
    runner = DetectorRunner(Settings())
    # Broken from the first window: nothing to compare with, so nothing pages...
    state, fired = run(runner, range(1, WARMUP + 1), lambda m: {"v1": Traffic(error_rate=0.5)})
    assert not any(fired.values())
    # ...and the baselines learned the model as it is.
    assert state["baselines"]["error_rate\x1f*"]["ready"]


def test_a_new_version_is_judged_against_the_models_baseline_from_its_first_window() -> None:
    runner = DetectorRunner(Settings())
    state, _ = run(runner, range(1, 31), healthy)

    def deploy(minute: int) -> dict[str, Traffic]:
        return {"v1": Traffic(requests=300), "v2": Traffic(requests=300, refusal_rate=0.3)}

    state, fired = run(runner, range(31, 33), deploy, state)
    (refusal,) = [f for f in fired[31] if f.signal == "refusal_rate"]
    assert refusal.segment == "model_version=v2" and refusal.model_version == "v2"
    assert refusal.kind is FindingKind.QUALITY
    assert refusal.severity in (Severity.ERROR, Severity.CRITICAL)
    assert refusal.title.startswith("Refusal rate ") and ", baseline " in refusal.title
    assert refusal.title.endswith(", chat v2")
    assert refusal.evidence["baseline"]["rate"] == pytest.approx(0.03, abs=0.01)
    assert not [f for f in fired[31] if f.model_version == "v1"]


def test_a_slower_version_pages_ttft_with_numbers_and_not_end_to_end_latency() -> None:
    runner = DetectorRunner(Settings())
    state, _ = run(runner, range(1, 31), healthy)
    state, fired = run(runner, range(31, 32), lambda m: {"v2": Traffic(ttft_ms=2400.0)}, state)
    signals = sorted(f.signal for f in fired[31])
    assert signals == ["ttft"], signals  # end-to-end latency is not a second incident
    (ttft,) = fired[31]
    assert ttft.kind is FindingKind.ANOMALY and ttft.severity is Severity.CRITICAL
    assert ttft.title.startswith("TTFT p95 ") and " s, baseline " in ttft.title
    assert ttft.evidence["baseline"]["value_ms"] == pytest.approx(600 * math.exp(0.3 * 1.645), 0.1)


def test_end_to_end_latency_is_judged_only_when_ttft_is_not_reported() -> None:
    runner = DetectorRunner(Settings())
    plain = Traffic(ttft_reported=False)
    state, _ = run(runner, range(1, 31), lambda m: {"v1": plain})
    assert "ttft\x1f*" not in state["baselines"] and "latency\x1f*" in state["baselines"]
    slow = Traffic(ttft_reported=False, tpot_ms=80.0)
    state, fired = run(runner, range(31, 32), lambda m: {"v1": slow}, state)
    assert [f.signal for f in fired[31]] == ["latency"]
    assert fired[31][0].title.startswith("Latency p95 ")


def test_an_error_burst_is_one_incident_of_kind_anomaly_and_clears() -> None:
    settings = Settings(incidents={"auto_resolve_quiet_windows": 2, "reopen_cooldown_s": 120})
    runner = DetectorRunner(settings)
    state, _ = run(runner, range(1, 31), healthy)
    state, fired = run(runner, range(31, 34), lambda m: {"v1": Traffic(error_rate=0.87)}, state)
    assert [f.signal for f in fired[31]] == ["error_rate"]  # no twin empty_rate
    error = fired[31][0]
    assert error.kind is FindingKind.ANOMALY and error.severity is Severity.CRITICAL
    assert error.title.startswith("Error rate 8") and "baseline 0." in error.title
    # A re-emitted window changes nothing.
    again, dup = runner.on_window(state, window(33, {"v1": Traffic(error_rate=0.87)}))
    assert dup == [] and again == state
    published = []
    for minute in range(34, 44):
        state, findings = runner.on_window(state, window(minute, healthy(minute)))
        published.append([f.detected for f in findings if f.signal == "error_rate"])
    # The alarm holds until the evidence has fallen to half its threshold (a few windows),
    # then exactly the clear windows the incident needs to auto-resolve, then quiet.
    ended = next(i for i, found in enumerate(published) if found == [False])
    assert ended <= 3 and all(found == [True] for found in published[:ended])
    assert published[ended : ended + 2] == [[False], [False]]
    assert published[-1] == []


def test_repeated_looks_at_a_healthy_model_do_not_page() -> None:
    # Six hours of windows with two versions and three segments each.
    def traffic(minute: int) -> dict[str, Traffic]:
        segments = {"app=a": (0.2, 20), "app=b": (0.3, 15), "app=c": (0.1, 25)}
        return {v: Traffic(requests=400, segments=segments) for v in ("v1", "v2")}

    _, fired = run(DetectorRunner(Settings()), range(1, 361), traffic, as_json=False)
    assert not [f.title for found in fired.values() for f in found]


def test_a_slow_degradation_is_not_learned_away() -> None:
    settings = Settings(detectors={"baseline_refresh_windows": 30})
    runner = DetectorRunner(settings)
    state, _ = run(runner, range(1, 61), healthy)

    def creeping(minute: int) -> dict[str, Traffic]:
        return {"v1": Traffic(error_rate=0.005 + 0.0004 * (minute - 60))}

    state, fired = run(runner, range(61, 241), creeping, state)
    first = min(m for m, found in fired.items() if any(f.signal == "error_rate" for f in found))
    assert first < 200  # paged while the rate crept up
    baseline = state["baselines"]["error_rate\x1f*"]
    reference = baseline["ref"]
    assert reference[1] / reference[2] < 0.008  # still the healthy rate


def test_each_segment_is_judged_against_its_own_baseline() -> None:
    runner = DetectorRunner(Settings())
    segments = {"app=writer": (0.5, 20), "app=coder": (0.1, 20)}
    state, _ = run(runner, range(1, 61), lambda m: {"v1": Traffic(segments=segments)})
    worse = {"app=writer": (0.5, 20), "app=coder": (0.6, 20)}
    state, fired = run(runner, range(61, 81), lambda m: {"v1": Traffic(segments=worse)}, state)
    found = [f for found in fired.values() for f in found]
    # The writer app has always been at 50 %: its own normal, never a page.
    assert {f.segment for f in found} == {"model_version=v1,app=coder"}
    assert found[0].kind is FindingKind.BIAS
    assert found[0].title.endswith("chat v1, app=coder")


def test_a_segment_holding_all_feedback_and_the_overflow_series_are_not_judged() -> None:
    runner = DetectorRunner(Settings())
    base = Traffic(scored=40, segments={"locale=en": None, "locale=__other__": (0.2, 30)})
    state, _ = run(runner, range(1, 31), lambda m: {"v1": base})
    keys = set(state["baselines"])
    assert "negative_feedback\x1f*" in keys
    assert not [k for k in keys if "locale=" in k]


def test_slos_page_without_warm_up_and_errors_say_what_to_write() -> None:
    settings = Settings(detectors={"slos": {"chat": ["ttft_p95 <= 1s"], "*": ["error_rate <= 2%"]}})
    runner = DetectorRunner(settings)
    _, fired = run(runner, range(1, 2), lambda m: {"v1": Traffic(ttft_ms=2400.0)})
    (slo,) = fired[1]
    assert slo.detector == "slo" and slo.signal == "ttft_p95" and slo.threshold == 1000.0
    assert slo.title.startswith("SLO ttft_p95 <= 1s breached: ")
    assert parse_slo("error_rate <= 2%").limit == pytest.approx(0.02)
    with pytest.raises(ConfigurationError, match=re.escape("ttft_p95 <= 1.5s")):
        parse_slo("ttft p95 under 2")
    with pytest.raises(ValueError, match="unknown metric"):
        Settings(detectors={"slos": {"chat": ["ttfb_p95 <= 1s"]}})


def test_thresholds_follow_the_budget_and_its_series() -> None:
    settings = Settings()
    budget = Budget(settings)
    weekly = 7 * 24 * 60
    assert budget.arl_windows("error_rate") == pytest.approx(weekly / 0.1)
    threshold, alpha = budget.rate_test("error_rate", 4)
    assert threshold == pytest.approx(math.log(2 * weekly / 0.1 * 4))
    assert alpha == pytest.approx(1 / (2 * weekly / 0.1 * 4))
    assert sum(row["false_pages_per_model_week"] for row in budget.table()) == pytest.approx(1.0)
    runner = DetectorRunner(settings)
    state, _ = run(runner, range(1, 17), lambda m: {"v1": Traffic(), "v2": Traffic()})
    found = runner.on_window(state, window(17, {"v1": Traffic(error_rate=0.9)}))[1]
    (error,) = [f for f in found if f.signal == "error_rate"]
    # Half the CUSUM's allowance goes to the early looks' pane charts (log 2 on the threshold).
    assert error.threshold == pytest.approx(budget.rate_test("error_rate", 1)[0] + SPLIT)


def test_a_restart_from_the_table_gives_identical_findings() -> None:
    def traffic(minute: int) -> dict[str, Traffic]:
        return {"v1": Traffic(error_rate=0.3 if 40 <= minute < 45 else 0.005)}

    _, straight = run(DetectorRunner(Settings()), range(1, 61), traffic, as_json=False)
    state, first = run(DetectorRunner(Settings()), range(1, 42), traffic)
    _, second = run(DetectorRunner(Settings()), range(42, 61), traffic, state)

    def titles(fired: dict) -> dict:
        return {m: [f.title for f in found] for m, found in fired.items()}

    assert titles(straight) == {**titles(first), **titles(second)}
    assert any(titles(straight).values())


# -- windows from the real core ---------------------------------------------------------------
def test_windows_from_the_real_core_are_judged() -> None:
    settings = Settings(embedding={"enabled": False}, windows={**WINDOWS})
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    now = [t0.timestamp()]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    runner = DetectorRunner(settings)
    state = None
    fired = []
    rng = np.random.default_rng(1)
    for second in range(0, 10 * 40, 2):
        now[0] = t0.timestamp() + second + 1
        failing = second >= 10 * 30
        events = [
            (
                None,
                InferenceEvent(
                    request_id=f"r{second}-{i}",
                    model_id="chat",
                    model_version="v1",
                    response="" if failing and i % 2 else "an answer",
                    status="error" if failing and i % 2 else "ok",
                    latency_ms=float(rng.lognormal(6, 0.3)),
                    time_to_first_token_ms=float(rng.lognormal(5, 0.3)),
                    completion_tokens=50,
                    started_at=t0 + timedelta(seconds=second),
                ),
            )
            for i in range(10)
        ]
        core.on_inferences(0, events)
        for closed in core.tick(0).windows:
            state, findings = runner.on_window(state, json.loads(json.dumps(closed)))
            fired += [f for f in findings if f.detected]
    assert {f.signal for f in fired} == {"error_rate"}, [f.title for f in fired]
    assert all(f.window_start >= t0 + timedelta(seconds=10 * 30) for f in fired)
    assert FeedbackEvent  # the feedback path is covered by test_pipeline_* and test_replay


# -- bounded detector state -------------------------------------------------------------------
def churn(minute: int) -> dict[str, Traffic]:
    """v1 with two steady apps and a new one each minute; every third minute a canary."""
    segments = {"app=steady-a": (0.2, 10), "app=steady-b": (0.2, 10), f"app=c{minute}": (0.8, 10)}
    versions = {"v1": Traffic(requests=100, segments=segments)}
    if minute % 3 == 0:
        versions[f"canary-{minute}"] = Traffic(requests=50)
    return versions


def test_churning_segments_and_versions_expire_and_steady_series_keep_their_state() -> None:
    runner = DetectorRunner(Settings(detectors={"series_ttl_s": 300}))
    state: dict | None = None
    sizes, baselines = [], []
    for minute in range(1, 121):
        state, _ = runner.on_window(state, window(minute, churn(minute)))
        state = json.loads(json.dumps(state))
        sizes.append(len(state["series"]))
        baselines.append(len(state["baselines"]))
        canaries = {k.split("\x1f")[2] for k in state["series"] if "canary" in k}
        assert canaries <= {f"canary-{i}" for i in range(minute - 5, minute + 1)}
    assert sizes[-12:] == sizes[-24:-12] and baselines[-12:] == baselines[-24:-12]
    assert max(baselines) <= 7 + 2 + 6  # model signals, steady apps, recent apps
    assert runner.series_evicted["ttl"] > 0
    steady = state["series"]["error_rate\x1frate_cusum\x1fv1\x1f*"]
    assert json.loads(json.dumps(steady))["det"]["state"]["n_seen"] == 100 * (120 - WARMUP)


def test_the_series_cap_and_the_size_bound_evict_least_recently_judged_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from genmon.streams.detection import model_state as model_state_module
    from genmon.streams.pipeline_metrics import PipelineMetrics

    runner = DetectorRunner(Settings(detectors={"max_series_per_model": 30}))
    state: dict | None = None
    for minute in range(1, 61):
        state, _ = runner.on_window(state, window(minute, churn(minute)))
        assert len(state["series"]) <= 30
    assert state is not None
    assert "judged in this window" not in caplog.text
    assert runner.series_evicted["cap"] > 0 and runner.series_evicted["ttl"] == 0
    assert "error_rate\x1frate_cusum\x1fv1\x1f*" in state["series"]  # judged every window

    monkeypatch.setattr(model_state_module, "STATE_MAX_BYTES", len(json.dumps(state)) + 500)
    bound = model_state_module.STATE_MAX_BYTES
    for minute in range(61, 71):
        state, _ = runner.on_window(state, window(minute, churn(minute)))
        assert len(json.dumps(state)) <= bound
    assert runner.series_evicted["size"] > 0

    registry = CollectorRegistry()
    PipelineMetrics(registry).sync_runner(runner)
    for reason in ("cap", "size"):
        sample = registry.get_sample_value(
            "genmon_detector_series_evicted_total", {"reason": reason}
        )
        assert sample == runner.series_evicted[reason]


def test_a_detector_whose_state_format_changed_restarts_its_series_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from genmon.detectors import RateCUSUM

    runner = DetectorRunner(Settings())
    state, _ = run(runner, range(1, WARMUP + 5), healthy)
    steady = "error_rate\x1frate_cusum\x1fv1\x1f*"
    seen = state["series"][steady]["det"]["state"]["n_seen"]
    per_window = seen // 4  # judged in 4 windows after the warm-up

    monkeypatch.setattr(RateCUSUM, "state_version", RateCUSUM.state_version + 1)
    state, findings = run(runner, range(WARMUP + 5, WARMUP + 6), healthy, state)
    assert not any(findings.values())
    restarted = state["series"][steady]["det"]
    assert restarted["format"] == RateCUSUM.state_version
    assert restarted["state"]["n_seen"] == per_window  # this window only: started afresh
    cusums = [key for key in state["series"] if "\x1frate_cusum\x1f" in key]
    assert runner.series_evicted["format"] == len(cusums)
    others = [state["series"][key]["det"] for key in state["series"] if key not in cusums]
    assert others and all(det["state"]["n_seen"] > 1 for det in others)  # kept theirs
    assert caplog.text.count("rate_cusum series restart") == 1  # said once, counted always
    assert state["baselines"]["error_rate\x1f*"]["ready"]  # the learned baselines carry on


def test_the_version_that_replaced_a_failing_one_publishes_its_clear_windows() -> None:
    # v1 fails; then only v2 serves (a retrained version promoted in its place). v2's series
    # never fired, but its clear windows are what can clear v1's incident
    # (genmon.incidents.grouping.superseded_incident), so they are published for the
    # cool-down after v1 fired; a CUSUM still rising says so ("elevated": not clear).
    settings = Settings(incidents={"auto_resolve_quiet_windows": 2, "reopen_cooldown_s": 600})
    runner = DetectorRunner(settings)
    state, _ = run(runner, range(1, 31), lambda m: {"v1": Traffic(), "v2": Traffic()})
    broken = {"v1": Traffic(error_rate=0.2), "v2": Traffic()}
    state, fired = run(runner, range(31, 33), lambda m: broken, state)
    assert {f.segment for found in fired.values() for f in found} == {"model_version=v1"}
    clear = []
    for minute in range(33, 40):
        state, findings = runner.on_window(state, window(minute, {"v2": Traffic()}))
        clear += [f for f in findings if f.signal == "error_rate"]
    assert clear and all(f.segment == "model_version=v2" and not f.detected for f in clear)
    assert not any(f.evidence.get("elevated") for f in clear)
    # Past the cool-down the siblings go quiet again.
    state, _ = run(runner, range(40, 50), lambda m: {"v2": Traffic()}, state)
    _, later = runner.on_window(state, window(50, {"v2": Traffic()}))
    assert [f for f in later if f.signal == "error_rate"] == []


def test_a_cusum_still_rising_below_its_threshold_is_not_a_clear_window() -> None:
    settings = Settings(incidents={"auto_resolve_quiet_windows": 2, "reopen_cooldown_s": 600})
    runner = DetectorRunner(settings)
    state, _ = run(runner, range(1, 31), healthy)
    state, _ = run(runner, range(31, 33), lambda m: {"v1": Traffic(error_rate=0.3)}, state)
    marks = {}
    for minute in range(33, 44):
        rate = 0.005 if minute < 40 else 0.012  # healthy again, then errors creep back
        state, findings = runner.on_window(state, window(minute, {"v1": Traffic(error_rate=rate)}))
        marks[minute] = [(f.detected, bool(f.evidence.get("elevated"))) for f in findings]
    # The healthy windows after the alarm are clear; the creeping ones are not detected
    # (the CUSUM is below its threshold) but say the evidence grew.
    assert [m for m in range(35, 40) if marks[m] == [(False, False)]] == list(range(35, 40))
    assert all(marks[m] == [(False, True)] for m in range(40, 44)), marks
