"""Unit tests of the detector runner: wiring, JSON state, duplicate windows, clear signals."""

from __future__ import annotations

import json

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
