"""Unit tests of the detector runner: wiring, JSON state, duplicate windows, clear signals,
overflow series and bounded state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pipeline_support import WINDOWS

from genmon.detectors import REGISTRY, load_state
from genmon.detectors.bias import SegmentCounts
from genmon.detectors.drift._common import decode_array
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams.pipeline_core import DictStore, PipelineCore
from genmon.streams.runner import DetectorRunner, bias_family_key


def window(end_s: int, p99: float, error_rate: float = 0.0, feedback=None) -> dict:
    series = [
        {
            "model_version": "v1",
            "segment": "*",
            "requests": 100,
            "latency_ms": {"p50": 10.0, "p90": 20.0, "p99": p99},
            "error_rate": error_rate,
            "refusal_rate": 0.0,
            "empty_rate": 0.0,
            "feedback": {"negative": 0, "positive": 0},
        }
    ]
    for seg, (neg, pos) in (feedback or {}).items():
        series.append(
            {
                "model_version": "v1",
                "segment": seg,
                "requests": neg + pos,
                "latency_ms": {"p99": p99},
                "error_rate": 0.0,
                "refusal_rate": 0.0,
                "empty_rate": 0.0,
                "feedback": {"negative": neg, "positive": pos},
            }
        )
    return {
        "model_id": "chat",
        "kind": "tumbling",
        "start_ms": (end_s - 60) * 1000,
        "end_ms": end_s * 1000,
        "window_start": f"2026-01-01T00:{(end_s - 60) // 60:02d}:00Z",
        "window_end": f"2026-01-01T00:{end_s // 60:02d}:00Z",
        "series": series,
    }


def test_latency_alarm_then_exactly_n_clears_and_duplicate_windows_are_skipped():
    settings = Settings(incidents={"auto_resolve_quiet_windows": 2, "reopen_cooldown_s": 120})
    runner = DetectorRunner(settings)
    state = None
    state, findings = runner.on_window(state, window(60, 100.0))
    assert findings == []
    state, findings = runner.on_window(state, window(120, 5000.0))
    fired = [f for f in findings if f.detector == "threshold" and f.signal == "latency_p99"]
    assert len(fired) == 1 and fired[0].detected and fired[0].segment == "model_version=v1"
    assert fired[0].n_seen == 2  # its own state: one value per window
    latency = [f.dedup_key for f in findings if f.signal == "latency_p99"]
    assert len(latency) == len(set(latency))  # each detector of a signal has its own state
    state = json.loads(json.dumps(state))  # what the Faust table keeps
    again, dup = runner.on_window(state, window(120, 5000.0))
    assert dup == [] and again == state  # a re-emitted window changes nothing
    clears = []
    for end in (180, 240, 300):
        state, findings = runner.on_window(state, window(end, 100.0))
        clears.append([f for f in findings if f.detector == "threshold"])
    assert [len(c) for c in clears] == [1, 1, 0]
    assert not clears[0][0].detected
    assert clears[0][0].fingerprint == fired[0].fingerprint
    assert clears[0][0].dedup_key != fired[0].dedup_key


def test_negative_feedback_bias_flags_the_bad_segment_only():
    runner = DetectorRunner(Settings())
    _state, findings = runner.on_window(
        None,
        window(
            60, 10.0, feedback={"locale=fr": (80, 20), "locale=en": (10, 90), "locale=de": (12, 88)}
        ),
    )
    flagged = [f for f in findings if f.signal == "negative_feedback" and f.detected]
    assert [f.segment for f in flagged] == ["model_version=v1,locale=fr"]
    assert flagged[0].kind == "bias"


# Every request carries a locale and a tier; fr's requests are split evenly across tiers.
# (negative, positive) feedback per series, each request counted once per attribute.
TWO_ATTRIBUTES = {
    "locale=fr": (80, 20),
    "locale=en": (10, 90),
    "locale=de": (12, 88),
    "locale=__other__": (4, 36),
    "tier=free": (40 + 5 + 6 + 2, 10 + 45 + 44 + 18),
    "tier=pro": (40 + 5 + 6 + 2, 10 + 45 + 44 + 18),
}


def test_each_attribute_is_its_own_bias_test_against_the_rest_of_its_own_traffic():
    runner = DetectorRunner(Settings())
    state, findings = runner.on_window(None, window(60, 10.0, feedback=TWO_ATTRIBUTES))
    feedback = [f for f in findings if f.signal == "negative_feedback"]
    # Only fr fired; the tiers, whose every request is in some locale, are equal.
    assert [(f.segment, f.detected) for f in feedback] == [("model_version=v1,locale=fr", True)]
    evidence = feedback[0].evidence
    # One BH family per attribute: fr was adjusted among the locales only.
    assert [s["segment"] for s in evidence["segments"]] == ["locale=de", "locale=en", "locale=fr"]
    fr = evidence["segments"][2]
    # fr's rest: de, en and the locale overflow, never the tier series holding fr again.
    assert (fr["n"], fr["rate"]) == (100, 0.8)
    assert fr["baseline_n"] == 100 + 100 + 40
    assert fr["baseline_rate"] == pytest.approx((12 + 10 + 4) / 240)
    tiers = load_state(state["series"][bias_family_key("v1", "tier")]["det"])
    tested = tiers.update([]).evidence.segments  # the tier test's sums so far
    assert sorted((s.segment, s.n, s.baseline_n, s.flagged) for s in tested) == [
        ("tier=free", 170, 170, False),
        ("tier=pro", 170, 170, False),
    ]
    assert {k for k in state["series"] if k.startswith("negative_feedback")} == {
        bias_family_key("v1", "locale"),
        bias_family_key("v1", "tier"),
        "negative_feedback\x1fv1\x1flocale=fr",  # its clear signals
    }


def test_a_state_from_before_per_attribute_tests_restores_and_its_family_is_dropped():
    runner = DetectorRunner(Settings(incidents={"auto_resolve_quiet_windows": 2}))
    # What the previous release stored: one family mixing both attributes (without
    # seen_ms: older still), and fr's clear-signal entry after it fired.
    old_family = REGISTRY["segment_rate_bias"](signal="negative_feedback", min_samples=30)
    old_family.update(
        [SegmentCounts(seg, neg, neg + pos) for seg, (neg, pos) in TWO_ATTRIBUTES.items()]
    )
    legacy = {
        "last_end": {"tumbling": 60_000},
        "series": {
            "negative_feedback\x1fv1\x1f(segments)": {"clears": 0, "det": old_family.state_dict()},
            "negative_feedback\x1fv1\x1flocale=fr": {"clears": 2, "fired_ms": 60_000},
        },
    }
    legacy = json.loads(json.dumps(legacy))  # as the changelog restores it
    calm = {seg: (10, 90) for seg in ("locale=fr", "locale=en", "locale=de")}
    state, findings = runner.on_window(legacy, window(120, 10.0, feedback=calm))
    assert "negative_feedback\x1fv1\x1f(segments)" not in state["series"]
    assert bias_family_key("v1", "locale") in state["series"]
    # fr's incident keeps its fingerprint and goes on receiving its clear signals.
    (clear,) = [f for f in findings if f.signal == "negative_feedback"]
    assert clear.segment == "model_version=v1,locale=fr" and not clear.detected
    assert state["series"]["negative_feedback\x1fv1\x1flocale=fr"]["clears"] == 1
    assert runner.series_evicted == {"ttl": 0, "cap": 0, "size": 0}  # not an eviction


def test_clears_continue_through_the_reopen_cool_down_so_flapping_incidents_can_resolve():
    settings = Settings(incidents={"auto_resolve_quiet_windows": 1, "reopen_cooldown_s": 200})
    runner = DetectorRunner(settings)
    state, _ = runner.on_window(None, window(60, 5000.0))
    published = []
    for end in (120, 180, 240, 300):
        state, findings = runner.on_window(state, window(end, 100.0))
        published.append(len([f for f in findings if f.detector == "threshold"]))
    assert published == [1, 1, 1, 0]  # 60 s + 200 s cool-down covers the ends up to 240 s


# -- embedding drift ------------------------------------------------------------------------
def small_embedding_settings(**detectors: object) -> Settings:
    # A window of 8 needs a 24-row reference; 4 dimensions keep calibration quick.
    return Settings(detectors={"drift_window": 8, "ert": 100, **detectors})


def embed(runner: DetectorRunner, state, end_s: int, rows: np.ndarray):
    end = datetime.fromtimestamp(1_700_000_000 + end_s, UTC)
    state, findings = runner.on_embeddings(state, "chat", "v1", "prompt", end, rows)
    return json.loads(json.dumps(state)), findings  # what the Faust table keeps


def series_entry(state: dict) -> dict:
    [entry] = state["series"].values()
    return entry


def samples(seed: int = 0) -> list[np.ndarray]:
    """Ten rows per window: three windows of reference, three stationary, three shifted."""
    rng = np.random.default_rng(seed)
    return [rng.normal(3.0 if i >= 6 else 0.0, 1.0, size=(10, 4)) for i in range(9)]


def test_small_samples_are_collected_across_windows_until_they_make_a_reference() -> None:
    runner = DetectorRunner(small_embedding_settings())
    data = samples()
    state = None
    for i in range(2):
        state, findings = embed(runner, state, 10 * (i + 1), data[i])
        entry = series_entry(state)
        assert findings == [] and "det" not in entry
        assert decode_array(entry["pending"]).shape == (10 * (i + 1), 4)
    state, findings = embed(runner, state, 30, data[2])
    entry = series_entry(state)
    assert findings == [] and "pending" not in entry
    detector = load_state(entry["det"])
    expected = np.concatenate(data[:3]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(detector.reference, expected)
    assert entry["det"]["params"]["reference"]["dtype"] == "<f2"  # stored exactly, half size
    fired = []
    for i in range(3, 9):
        state, findings = embed(runner, state, 10 * (i + 1), data[i])
        fired += [f for f in findings if f.detected]
    assert fired and fired[0].signal == "embedding_prompt" and fired[0].kind == "drift"
    assert fired[0].window_end >= datetime.fromtimestamp(1_700_000_070, UTC)  # shifted windows


def test_a_redelivered_sample_changes_nothing() -> None:
    runner = DetectorRunner(small_embedding_settings())
    data = samples()
    state, _ = embed(runner, None, 10, data[0])
    again, findings = embed(runner, state, 10, data[1])
    assert again == state and findings == []


def test_the_reference_is_a_subset_capped_at_reference_size() -> None:
    runner = DetectorRunner(small_embedding_settings(reference_size=40))
    rows = np.random.default_rng(1).normal(size=(100, 4))
    state, _ = embed(runner, None, 10, rows)
    reference = load_state(series_entry(state)["det"]).reference
    assert reference.shape == (40, 4)
    half = rows.astype(np.float16).astype(np.float32)
    assert all((half == row).all(1).any() for row in reference)  # rows of the sample


def test_a_configuration_whose_state_cannot_fit_is_refused_with_what_to_change() -> None:
    runner = DetectorRunner(Settings(detectors={"drift_window": 300}))
    with pytest.raises(ConfigurationError, match="drift_window"):
        embed(runner, None, 10, np.zeros((900, 384), dtype=np.float32))


def test_detectors_stay_live_and_a_restart_from_the_table_gives_identical_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from genmon.detectors.drift.online_mmd import OnlineMMDDrift

    calibrations = []
    calibrate = OnlineMMDDrift._calibrate

    def counting(self: OnlineMMDDrift) -> None:
        calibrations.append(1)
        calibrate(self)

    monkeypatch.setattr(OnlineMMDDrift, "_calibrate", counting)
    data = samples()

    def run(runner: DetectorRunner, state, first: int):
        found, states = [], []
        for i in range(first, 9):
            state, findings = embed(runner, state, 10 * (i + 1), data[i])
            found.append([f.model_dump(exclude={"finding_id", "emitted_at"}) for f in findings])
            states.append(series_entry(state)["det"])
        return found, states, state

    live = DetectorRunner(small_embedding_settings())
    state = None
    for i in range(4):
        state, _ = embed(live, state, 10 * (i + 1), data[i])
    after_four = state
    found, states, _ = run(live, state, 4)
    assert len(calibrations) == 1  # fitted once, then the live detector served every window
    assert any(any(f["detected"] for f in window) for window in found)

    restarted = DetectorRunner(small_embedding_settings())  # empty cache, state from the table
    assert run(restarted, after_four, 4)[:2] == (found, states)
    assert len(calibrations) == 2  # rebuilt once, then live again

    # The table holds another state than the one the cached detector wrote (another worker
    # wrote the series meanwhile): the cache is not used.
    stale_found, _, _ = run(live, after_four, 4)
    assert stale_found == found and len(calibrations) == 3


def test_the_live_detector_cache_is_bounded_and_cleared_on_rebalance() -> None:
    runner = DetectorRunner(small_embedding_settings(), live_detectors=2)
    rows = samples()[0]
    rows = np.concatenate([rows, rows, rows])
    for model in ("a", "b", "c"):
        end = datetime.fromtimestamp(1_700_000_010, UTC)
        runner.on_embeddings(None, model, "v1", "prompt", end, rows)
    assert [json.loads(key)[0] for key in runner._live] == ["b", "c"]
    runner.forget_live_detectors()
    assert not runner._live


# -- overflow series ------------------------------------------------------------------------
def feedback_window(
    end_s: int, versions: dict[str, dict[str, tuple[int, int]]], p99: float = 10.0
) -> dict:
    """A tumbling window: per version, 100 requests (latency ``p99``) and (negative,
    positive) feedback per segment."""
    series = []
    for version, segments in versions.items():
        series.append({**window(end_s, p99)["series"][0], "model_version": version})
        for seg, (neg, pos) in segments.items():
            series.append(
                {
                    **window(end_s, 10.0, feedback={seg: (neg, pos)})["series"][1],
                    "model_version": version,
                }
            )
    end = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=end_s)
    return {
        **window(end_s, 10.0),
        "window_start": (end - timedelta(seconds=60)).isoformat(),
        "window_end": end.isoformat(),
        "series": series,
    }


OVERFLOW = "locale=__other__"


def test_the_overflow_series_is_in_the_rest_but_never_a_compared_segment() -> None:
    runner = DetectorRunner(Settings())
    feedback = {"locale=en": (10, 90), "locale=de": (12, 88), "locale=fr": (80, 20)}
    # The mixed bucket is worse than any segment and the largest: tested, it would page.
    _, findings = runner.on_window(
        None, window(60, 10.0, feedback={**feedback, OVERFLOW: (300, 100)})
    )
    feedback_findings = [f for f in findings if f.signal == "negative_feedback"]
    assert [f.segment for f in feedback_findings] == ["model_version=v1,locale=fr"]
    evidence = feedback_findings[0].evidence
    assert [s["segment"] for s in evidence["segments"]] == ["locale=de", "locale=en", "locale=fr"]
    fr = evidence["segments"][2]
    # fr is compared with all the rest of the traffic, the overflow series' 400 included.
    assert fr["baseline_n"] == 100 + 100 + 400
    assert fr["baseline_rate"] == pytest.approx((10 + 12 + 300) / 600)
    assert f"in the population, not tested (this window): {OVERFLOW} (n=400)" in evidence["notes"]


def test_without_the_bias_detector_the_overflow_series_gets_no_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(REGISTRY, "segment_rate_bias")
    runner = DetectorRunner(Settings())
    feedback = {"locale=en": (10, 90), "locale=fr": (80, 20), OVERFLOW: (300, 100)}
    state, findings = runner.on_window(None, window(60, 10.0, feedback=feedback))
    assert [f.segment for f in findings if f.signal == "negative_feedback"] == [
        "model_version=v1,locale=fr"
    ]
    assert not any(OVERFLOW in key for key in state["series"])


def test_overflow_from_the_real_core_does_not_page_and_stays_in_the_population() -> None:
    settings = Settings(
        embedding={"enabled": False},
        windows={**WINDOWS, "max_segment_values": 2},
        detectors={"min_segment_size": 10},
    )
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    core = PipelineCore(settings, DictStore(), clock=lambda: t0.timestamp() + 3600)

    def inference(rid: str, t_s: float, segment: dict[str, str]) -> InferenceEvent:
        return InferenceEvent(
            request_id=rid,
            model_id="chat",
            model_version="v1",
            response="an answer",
            latency_ms=10.0,
            segment=segment,
            started_at=t0 + timedelta(seconds=t_s),
        )

    events, feedback = [], []
    for i in range(120):
        locale = ("en", "de", "fr", "it")[i % 4]  # en and de take the two slots
        events.append(inference(f"r{i}", 0.04 * i, {"locale": locale}))
        # fr and it are mostly disliked, en and de mostly liked.
        bad = (i // 4) % 10 < 9 if locale in ("fr", "it") else (i // 4) % 10 == 0
        feedback.append(
            FeedbackEvent(
                feedback_id=f"f{i}",
                request_id=f"r{i}",
                model_id="chat",
                thumbs="down" if bad else "up",
                created_at=t0 + timedelta(seconds=8),
            )
        )
    core.on_inferences(0, list(enumerate(events)))
    core.on_feedback(0, list(enumerate(feedback)))
    core.on_inferences(0, [(None, inference("tick", 25, {}))])  # closes the first window
    (closed,) = [w for w in core.tick(0).windows if w["kind"] == "tumbling"]
    closed = json.loads(json.dumps(closed))  # as it crosses Kafka
    assert closed["segment_overflow"] == {"locale": {"requests": 60, "feedback": 60}}

    state, findings = DetectorRunner(settings).on_window(None, closed)
    assert not [f for f in findings if f.signal == "negative_feedback"]
    # The locale test's state holds the overflow traffic in its population only.
    family = load_state(state["series"][bias_family_key("v1", "locale")]["det"])
    segments = family.update([]).evidence.segments
    assert sorted((s.segment, s.n, s.baseline_n) for s in segments) == [
        ("locale=de", 30, 90),
        ("locale=en", 30, 90),
    ]


# -- bounded detector state -----------------------------------------------------------------
def churn(end_s: int) -> dict:
    """v1 with two steady calm campaigns and a new, bad one each minute; every third
    minute a one-off canary version."""
    w = end_s // 60
    versions = {
        "v1": {
            "campaign=steady-a": (10, 90),
            "campaign=steady-b": (11, 89),
            f"campaign=c{w}": (80, 20),
        }
    }
    if w % 3 == 0:
        versions[f"canary-{w}"] = {"campaign=steady-a": (10, 90)}
    return feedback_window(end_s, versions)


def segment_keys(state: dict) -> set[str]:
    return {k.split("\x1f")[-1] for k in state["series"] if k.startswith("negative_feedback")}


def test_churning_segments_and_versions_expire_and_steady_series_keep_their_state() -> None:
    runner = DetectorRunner(Settings(detectors={"series_ttl_s": 300}))
    state: dict | None = None
    sizes = []
    for w in range(1, 61):
        state, findings = runner.on_window(state, churn(60 * w))
        state = json.loads(json.dumps(state))  # what the Faust table keeps
        sizes.append(len(state["series"]))
        # A fired campaign keeps its entry (for its clear signals) while judged: while its
        # one bad minute is in the bias detector's 12-window ring, then 300 s more.
        fired = {f"campaign=c{i}" for i in range(max(w - 16, 1), w + 1)}
        # The campaign test, and fired campaigns: calm ones leave nothing.
        assert segment_keys(state) == fired | {"campaign"}
        # A one-off canary version's five detectors and bias family: 300 s.
        canaries = {k.split("\x1f")[-2] for k in state["series"] if "canary" in k}
        assert canaries == {f"canary-{i}" for i in range(max(w - 5, 1), w + 1) if i % 3 == 0}
    assert max(sizes) <= 5 + 1 + 17 + 2 * 6  # v1, its family, campaigns, canaries
    assert sizes[-12:] == sizes[-24:-12]  # a steady cycle, no growth
    assert runner.series_evicted["ttl"] > 0
    # v1's series were judged every minute: 60 windows in their detectors.
    state, findings = runner.on_window(state, feedback_window(61 * 60, {"v1": {}}))
    family_state = load_state(state["series"][bias_family_key("v1", "campaign")]["det"])
    assert family_state.state_dict()["state"]["n_seen"] == 60 * 300
    state, findings = runner.on_window(state, feedback_window(62 * 60, {"v1": {}}, 5000.0))
    (latency,) = [f for f in findings if f.signal == "latency_p99" and f.detector == "threshold"]
    assert latency.detected and latency.n_seen == 62


def test_a_segment_back_after_the_ttl_starts_fresh_and_eviction_replays_identically(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Per-segment threshold detectors: each segment has a detector (and n_seen) of its own.
    monkeypatch.delitem(REGISTRY, "segment_rate_bias")
    settings = Settings(detectors={"series_ttl_s": 300})

    def minute(w: int) -> dict:
        segments = {"campaign=steady": (80, 20)}
        if w <= 3 or w >= 10:  # away from minute 4 to 9: over 300 s unjudged
            segments["campaign=back"] = (70, 30)
        return feedback_window(60 * w, {"v1": segments})

    def run(runner: DetectorRunner, state: dict | None, minutes: range) -> tuple[dict, dict]:
        n_seen = {}
        for w in minutes:
            state, findings = runner.on_window(state, minute(w))
            state = json.loads(json.dumps(state))
            n_seen[w] = {f.segment.split(",")[-1]: f.n_seen for f in findings if f.detected}
        return state, n_seen

    state, first = run(DetectorRunner(settings), None, range(1, 8))
    assert first[3] == {"campaign=back": 3, "campaign=steady": 3}
    assert "negative_feedback\x1fv1\x1fcampaign=back" in state["series"]  # 240 s unjudged
    # A restart: a new runner continues from the table's state.
    state, second = run(DetectorRunner(settings), state, range(8, 12))
    assert "campaign=back" not in second[9] and second[9]["campaign=steady"] == 9
    assert second[10] == {"campaign=back": 1, "campaign=steady": 10}  # back, fresh
    assert second[11] == {"campaign=back": 2, "campaign=steady": 11}
    # A replay of the stream from the start evicts the same series at the same windows.
    replayed, _ = run(DetectorRunner(settings), None, range(1, 12))
    assert replayed == state


def test_the_series_cap_and_the_size_bound_evict_least_recently_judged_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from genmon.streams import runner as runner_module
    from genmon.streams.pipeline import PipelineMetrics

    # No TTL within the test: fired campaigns and canaries would pile up without the cap.
    runner = DetectorRunner(Settings(detectors={"max_series_per_model": 30}))
    state: dict | None = None
    for w in range(1, 31):
        state, _ = runner.on_window(state, churn(60 * w))
        assert len(state["series"]) <= 30
    assert state is not None
    # The least recently judged went; every series judged in a window was kept.
    assert "judged in this window" not in caplog.text
    assert segment_keys(state) >= {f"campaign=c{w}" for w in range(19, 31)}  # in the ring
    assert runner.series_evicted["cap"] > 0 and runner.series_evicted["ttl"] == 0
    state, findings = runner.on_window(state, feedback_window(31 * 60, {"v1": {}}, 5000.0))
    (latency,) = [f for f in findings if f.signal == "latency_p99" and f.detector == "threshold"]
    assert latency.n_seen == 31  # v1 kept its state throughout

    # The state also stays under its byte bound (one changelog record under 1 MB).
    monkeypatch.setattr(runner_module, "STATE_MAX_BYTES", 7000)
    for w in range(32, 42):
        state, _ = runner.on_window(state, churn(60 * w))
        assert len(json.dumps(state)) <= 7000
    assert runner.series_evicted["size"] > 0
    assert "judged in this window" not in caplog.text

    registry = CollectorRegistry()
    PipelineMetrics(registry).sync_runner(runner)
    for reason in ("cap", "size"):
        sample = registry.get_sample_value(
            "genmon_detector_series_evicted_total", {"reason": reason}
        )
        assert sample == runner.series_evicted[reason]

    # A cap below the series of one window cannot keep them: said in the log.
    small = DetectorRunner(Settings(detectors={"max_series_per_model": 3}))
    small.on_window(None, churn(60))
    assert "max_series_per_model=3" in caplog.text
