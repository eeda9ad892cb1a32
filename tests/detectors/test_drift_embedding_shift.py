"""EmbeddingShiftDrift: detection at a known change point, per-window false-alarm calibration on
two null kinds (all scales and both statistics), shifts only the residual or a longer scale
sees, low-traffic windows, the healthy-only refresh, and JSON state at d = 384."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from scipy import stats

from genmon.detectors import EmbeddingShiftDrift, InputError, load_state

ALPHAS = (1e-2, 3e-3, 1e-3)
MIN_EXPECTED_ALARMS = 300


def _windows(
    rng: np.random.Generator, count: int, d: int, kind: str, sizes: tuple[int, int] = (20, 61)
) -> Iterator[np.ndarray]:
    """``count`` null windows of 20-60 rows, generated in vectorised chunks.

    ``iid``: standard normal rows. ``clustered``: four fixed clusters; each window draws its
    own mixture proportions (Dirichlet(2)), so window means vary more than sampling noise
    and mostly along the three directions that separate the clusters.
    """
    centers = rng.normal(scale=1.5, size=(4, d)).astype(np.float32)
    for lo in range(0, count, 10_000):
        w = min(10_000, count - lo)
        ns = rng.integers(*sizes, size=w)
        rows = rng.standard_normal(size=(int(ns.sum()), d), dtype=np.float32)
        if kind == "clustered":
            cum = np.cumsum(rng.dirichlet(np.full(4, 2.0), size=w), 1)[np.repeat(np.arange(w), ns)]
            rows += centers[(rng.random(len(rows))[:, None] > cum[:, :3]).sum(1)]
        yield from np.split(rows, np.cumsum(ns)[:-1])


@pytest.mark.parametrize("kind", ["iid", "clustered"])
def test_false_alarms_per_window_match_alpha(kind: str) -> None:
    # One stream per null kind, 300 / alpha windows for each alpha: each window is one look,
    # so the alarm count is Binomial(windows, <= alpha), all scales and both statistics
    # together. A detector at level alpha alarms exactly when its (Bonferroni-adjusted)
    # p_value < alpha, so the smallest alpha's detector gives the counts at all three levels
    # (its refreshes, every 1,440 windows as in production, follow that alpha).
    need = [int(MIN_EXPECTED_ALARMS / a) for a in ALPHAS]
    detector = EmbeddingShiftDrift(alpha=min(ALPHAS), components=8)
    tested, alarms = [0] * 3, [0] * 3
    for i, window in enumerate(_windows(np.random.default_rng(2024), max(need), 12, kind)):
        result = detector.update(window)
        p = 1.0 if result.p_value is None else result.p_value
        assert result.detected == (p < min(ALPHAS))
        for j, alpha in enumerate(ALPHAS):
            if i < need[j]:
                tested[j] += result.p_value is not None
                alarms[j] += p < alpha
    for alpha, windows, observed in zip(ALPHAS, tested, alarms, strict=True):
        expected = alpha * windows
        assert expected >= 0.97 * MIN_EXPECTED_ALARMS  # the warm-up windows are not tested
        limit = stats.poisson.ppf(0.999, expected)
        assert observed < limit, f"{kind} alpha={alpha}: {observed} alarms, expected {expected}"


def test_the_calibration_bound_rejects_twenty_percent_too_many_alarms() -> None:
    # The 0.999 Poisson quantile above is tight enough: a detector raising 1.2 x alpha alarms
    # per window would exceed it with probability > 0.999 at these expected counts.
    for expected in (0.97 * MIN_EXPECTED_ALARMS, MIN_EXPECTED_ALARMS):
        assert stats.poisson.sf(1.2 * expected, expected) < 0.001
        assert stats.poisson.ppf(0.999, expected) < 1.2 * expected


def _cluster_stream(rng: np.random.Generator, d: int, n: int, before: int, after: int) -> list:
    """Three fixed clusters mixed in per-window proportions; after the change half of each
    window comes from a fourth cluster never seen before."""
    centers = rng.normal(size=(4, d))
    out = []
    for i in range(before + after):
        p = np.append(rng.dirichlet(np.full(3, 3.0)), 0.0)
        if i >= before:
            p = p * 0.5 + np.array([0.0, 0.0, 0.0, 0.5])
        out.append(centers[rng.choice(4, size=n, p=p)] + rng.normal(size=(n, d)))
    return out


def _shift_stream(rng: np.random.Generator, d: int, n: int, before: int, after: int) -> list:
    """Standard normal rows; after the change three of the d dimensions move by 0.5 sd."""
    out = [rng.normal(size=(n, d)) for _ in range(before + after)]
    for window in out[before:]:
        window[:, :3] += 0.5
    return out


@pytest.mark.parametrize("make", [_shift_stream, _cluster_stream], ids=["shift", "new_cluster"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detects_known_change_point_in_the_first_window(make, seed: int) -> None:
    # Default parameters (alpha = 1e-6, 20 reference windows), 200 texts per window: two
    # windows of basis, 20 of reference, 30 tested healthy windows, then the change.
    rng = np.random.default_rng(seed)
    change = 52
    detector = EmbeddingShiftDrift()
    flags = [detector.update(w).detected for w in make(rng, 16, 200, change, 5)]
    assert not any(flags[:change]), f"false alarm at window {flags.index(True)}"
    assert flags[change], "the change was not detected in the first window after it"
    assert all(flags[change:])  # a persistent shift keeps being detected


def test_healthy_candidate_replaces_the_reference_and_detected_windows_stay_out() -> None:
    rng = np.random.default_rng(5)
    detector = EmbeddingShiftDrift(components=6, refresh_windows=40)
    windows = list(_windows(rng, 3 + 20 + 41 + 15, 10, "iid", sizes=(100, 101)))
    for window in windows[:30]:  # 3 of basis (256 rows), 20 of reference, 7 tested
        detector.update(window)
    shifted = detector.update(windows[30] + 1.0)
    assert shifted.detected and shifted.evidence.value("candidate_windows") == 7
    flags = []
    for window in windows[31:]:
        result = detector.update(window)
        flags.append(result.detected)
        if result.evidence.value("refreshes"):
            break
    values = dict(result.evidence.values)
    assert values["refreshes"] == 1 and values["refused_refreshes"] == 0
    assert values["reference_windows"] == 40 and values["candidate_windows"] == 0
    # Only the windows whose longer scales still hold the shifted one fire, and stay out.
    after = flags.index(False)
    assert 3 <= after <= 15 and not any(flags[after:]) and len(flags) == after + 33


def _drift_stream(rng: np.random.Generator, shift: float, windows: int) -> list:
    """Four dimensions, n = 100: 103 windows of basis and reference, then ``windows`` whose
    mean has moved ``shift`` sd along two of them."""
    out = list(_windows(rng, 103 + windows, 4, "iid", sizes=(100, 101)))
    for window in out[103:]:
        window[:, :2] += shift
    return out


def test_drifted_candidate_is_refused_and_the_reference_kept() -> None:
    # A small step: 0.11 sd along two of four dimensions. Sixteen windows of 100 rows see a
    # noncentrality of 1600 x 2 x 0.11^2 = 39, ~25 once the between-window bound widens the
    # variance, against a threshold of 37 (alpha = 1e-6 / 6): the longest scale fires now and
    # then (2 of 100 windows with this seed), while the tested windows' mean, scored as that
    # scale would, exceeds half the threshold: the candidate is refused.
    detector = EmbeddingShiftDrift(components=4, reference_windows=100, refresh_windows=50)
    stream = _drift_stream(np.random.default_rng(4), 0.11, 100)
    detected = [detector.update(window).detected for window in stream]
    values = dict(detector.update(stream[-1]).evidence.values)
    assert values["refused_refreshes"] >= 1 and values["refreshes"] == 0
    assert values["reference_windows"] == 100
    assert sum(detected) <= 10, f"{sum(detected)} of 100 windows crossed; not a small drift"


def test_small_sustained_shift_is_found_at_a_longer_scale_and_not_before() -> None:
    # 0.4 sd along one of the top directions, n = 30: noncentrality 4.8 for one window
    # (threshold ~38 at alpha / 6), 19 for four windows, 77 for sixteen.
    rng = np.random.default_rng(8)
    detector = EmbeddingShiftDrift(components=4)
    sd = np.array([2.0] * 4 + [1.0] * 4)
    change = 9 + 34 + 30  # basis, reference (1000 rows), healthy tested windows
    results = []
    for i in range(change + 20):
        window = rng.normal(size=(30, 8)) * sd
        window[:, 0] += 0.4 * 2.0 * (i >= change)
        results.append(detector.update(window))
    assert not any(r.detected for r in results[:change])
    hits = [r for r in results[change:] if r.detected]
    assert hits, "a sustained 0.4 sd shift was not found within 20 windows"
    assert all(r.evidence.value("scale_windows") > 1 for r in hits)
    assert hits[0].evidence.value("residual") == 0.0


def test_shift_outside_the_top_k_subspace_is_found_by_the_residual() -> None:
    # The top four directions carry most of the variance; after the change every row gains
    # 2 sd along a direction orthogonal to them: T^2 barely moves, q jumps.
    rng = np.random.default_rng(9)
    detector = EmbeddingShiftDrift(components=4)
    sd = np.array([3.0] * 4 + [1.0] * 4)
    change = 6 + 20 + 20
    results = []
    for i in range(change + 5):
        window = rng.normal(size=(50, 8)) * sd
        window[:, 7] += 2.0 * (i >= change)
        results.append(detector.update(window))
    assert not any(r.detected for r in results[:change])
    first = results[change]
    assert first.detected and first.evidence.value("residual") == 1.0
    assert first.evidence.value("scale_windows") == 1.0
    assert first.evidence.value("t2_p") > 1e-3 and first.evidence.value("q_z") > 5


def test_low_traffic_windows_are_tested_at_the_longer_scales() -> None:
    # 10 rows per window, below min_window_rows = 20: single windows are never tested, but
    # 4 and 16 of them are, and a shift is found.
    rng = np.random.default_rng(10)
    detector = EmbeddingShiftDrift(components=4)
    results = [detector.update(rng.normal(size=(10, 8))) for _ in range(26 + 100 + 30)]
    tested = [r for r in results[-30:] if r.p_value is not None]
    assert len(tested) >= 27 and not any(r.detected for r in results)
    assert {r.evidence.value("scale_windows") for r in tested} <= {4.0, 16.0}
    shifted = [detector.update(rng.normal(size=(10, 8)) + 0.8) for _ in range(4)]
    assert any(r.detected for r in shifted)


def test_state_round_trip_and_size_at_384_dimensions() -> None:
    rng = np.random.default_rng(3)
    detector = EmbeddingShiftDrift(refresh_windows=5)

    def window(n: int) -> np.ndarray:
        x = rng.normal(size=(n, 384)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sizes = {}
    # Basis at its largest (255 rows kept), reference, testing (with a candidate), refreshed.
    for phase, batches in (("basis", [255]), ("reference", [1] + [60] * 5), ("test", [60] * 8)):
        for n in batches:
            detector.update(window(n))
        snapshot = json.loads(json.dumps(detector.state_dict()))
        sizes[phase] = len(json.dumps(snapshot))
        restored = load_state(snapshot)
        assert restored.state_dict() == snapshot
        future = [window(n) for n in (60, 30, 5)]
        assert [detector.update(b).to_dict() for b in future] == [
            restored.update(b).to_dict() for b in future
        ]
    assert max(sizes.values()) < 900_000, sizes
    assert sizes["test"] < 100_000, sizes  # O(d k + k^2) once the raw rows are dropped


def test_dead_dimensions_and_constant_rows_never_fire() -> None:
    # Zero variance in some directions (a constant sub-vector) must not divide by zero.
    rng = np.random.default_rng(4)
    detector = EmbeddingShiftDrift(components=8, min_reference_rows=200)
    for _ in range(60):
        x = np.zeros((40, 12))
        x[:, :3] = rng.normal(size=(40, 3))
        x[:, 3:] = 0.25
        result = detector.update(x)
        assert not result.detected and np.isfinite(result.score)


def test_rejects_a_window_of_another_width() -> None:
    detector = EmbeddingShiftDrift()
    detector.update(np.zeros((10, 8)))
    with pytest.raises(InputError):
        detector.update(np.zeros((10, 9)))


def test_a_new_topic_in_a_quarter_of_the_texts_is_found_by_their_novelty() -> None:
    """Texts of three topics, mixed in proportions that change from look to look, each
    look's texts more or less spread out together (a burst of odd prompts: the mean and
    the residuals wander); then a quarter of them come from a fourth topic, away from the
    others. The mean moves a quarter of the way, hidden in its wander; the novel texts,
    each above the 99th percentile of the healthy residuals, are found by their share,
    judged against how much the healthy looks' shares vary."""
    rng = np.random.default_rng(21)
    d, per_look = 24, 8
    topics = rng.normal(scale=3.0, size=(4, d))
    topics[3, :] = 0.0
    topics[3, -6:] = 6.0  # outside the space the first three span

    def look(new_share: float) -> np.ndarray:
        mix = np.append(rng.dirichlet(np.full(3, 0.5)) * (1 - new_share), new_share)
        which = rng.choice(4, size=per_look, p=mix)
        return topics[which] + rng.normal(size=(per_look, d)) * rng.lognormal(0.0, 0.5)

    detector = EmbeddingShiftDrift(alpha=1e-6, components=4, min_reference_rows=400)
    before = [detector.update(look(0.0)) for _ in range(400)]
    assert not any(r.detected for r in before)
    assert before[-1].evidence.value("novelty_share") is not None
    after = [detector.update(look(0.25)) for _ in range(40)]
    first = next(i for i, r in enumerate(after) if r.detected)
    assert first < 30, first
    assert after[first].evidence.notes[0].startswith("novel texts: ")
    assert after[first].p_value is not None and after[first].p_value < 1e-6
    # The state carries the novelty test: a restored detector goes on identically.
    restored = load_state(json.loads(json.dumps(detector.state_dict())))
    nxt = look(0.25)
    assert restored.update(nxt).to_dict() == detector.update(nxt).to_dict()
