"""Empty / truncated responses: classification and the rate detector."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from genmon.detectors import EmptyTruncatedRateDetector, InputError
from genmon.detectors.quality import classify_response
from genmon.schemas.events import FinishReason, InferenceEvent, InferenceStatus


def _event(
    response: str, finish: FinishReason | None = None, status: InferenceStatus = InferenceStatus.OK
) -> InferenceEvent:
    return InferenceEvent(
        model_id="m",
        prompt="p",
        response=response,
        latency_ms=10.0,
        finish_reason=finish,
        status=status,
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_classify_texts_mappings_and_events() -> None:
    assert classify_response("") == (True, False)
    assert classify_response("\n \t") == (True, False)
    assert classify_response("ok") == (False, False)
    assert classify_response({"response": "", "finish_reason": "stop"}) == (True, False)
    assert classify_response(_event("half a sent", FinishReason.LENGTH)) == (False, True)
    assert classify_response(_event("x", status=InferenceStatus.TRUNCATED)) == (False, True)
    assert classify_response(_event("full answer.", FinishReason.STOP)) == (False, False)
    with pytest.raises(InputError, match="texts, mappings"):
        classify_response(3.5)


def test_max_tokens_regression_is_detected_with_split_evidence() -> None:
    rng = np.random.default_rng(0)
    detector = EmptyTruncatedRateDetector(reference_size=300, window_size=100, min_samples=50)

    def batch(truncated: float, n: int = 50) -> list[InferenceEvent]:
        return [
            _event("cut", FinishReason.LENGTH)
            if u < truncated
            else _event("done.", FinishReason.STOP)
            for u in rng.random(n)
        ]

    assert not any(detector.update(batch(0.02)).detected for _ in range(12))
    results = [detector.update(batch(0.15)) for _ in range(3)]
    # Found by the time the 100-item window holds only post-change responses.
    first = next(r for r in results if r.detected)
    assert first is results[0] or first is results[1]
    assert first.evidence.value("truncated") > 0 and first.evidence.value("empty") == 0


def test_no_alarm_on_stationary_rate() -> None:
    rng = np.random.default_rng(3)
    detector = EmptyTruncatedRateDetector(baseline_rate=0.03, window_size=200, min_samples=200)
    fired = sum(
        detector.update(["" if u < 0.03 else "answer" for u in rng.random(200)]).detected
        for _ in range(200)
    )
    assert fired <= 6
