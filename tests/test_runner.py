"""Unit tests of the detector runner: wiring, JSON state, duplicate windows, clear signals."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from genmon.detectors import load_state
from genmon.detectors.drift._common import decode_array
from genmon.exceptions import ConfigurationError
from genmon.settings import Settings
from genmon.streams.runner import DetectorRunner


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
