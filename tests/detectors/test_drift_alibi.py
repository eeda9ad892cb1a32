"""The optional alibi-detect backend: a clear error without it, detection with it.

alibi-detect 0.13 needs NumPy < 2, so its tests run in a separate environment:
``.build/alibi-venv/bin/python -m pytest tests/detectors/test_drift_alibi.py
tests/detectors/test_contract.py -k alibi`` (see bench/detectors/README.md).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from genmon.detectors.backends.alibi import AlibiKSDrift, AlibiMMDDriftOnline
from genmon.exceptions import ConfigurationError

HAS_ALIBI = importlib.util.find_spec("alibi_detect") is not None


@pytest.mark.skipif(HAS_ALIBI, reason="alibi-detect is installed here")
def test_missing_alibi_raises_configuration_error_with_install_hint() -> None:
    reference = np.random.default_rng(0).normal(size=(100, 4))
    with pytest.raises(ConfigurationError, match=r"pip install 'genmon\[alibi\]'"):
        AlibiMMDDriftOnline(reference, window_size=10, ert=50, n_bootstraps=200)


@pytest.mark.skipif(not HAS_ALIBI, reason="needs the alibi extra (.build/alibi-venv)")
def test_alibi_online_mmd_detects_known_change_point() -> None:
    rng = np.random.default_rng(4)
    detector = AlibiMMDDriftOnline(
        rng.normal(size=(300, 8)), window_size=16, ert=500, n_bootstraps=1000, seed=1
    )
    before = detector.update(rng.normal(size=(30, 8)))
    after = detector.update(rng.normal(1.0, 1.0, size=(100, 8)))
    assert not before.detected
    assert after.detected and after.evidence.value("first_detection_index") <= 16


@pytest.mark.skipif(not HAS_ALIBI, reason="needs the alibi extra (.build/alibi-venv)")
def test_alibi_ks_flags_a_shifted_window() -> None:
    rng = np.random.default_rng(2)
    detector = AlibiKSDrift(rng.normal(size=(500, 8)), window_size=200, alpha=0.01)
    assert not detector.update(rng.normal(size=(200, 8))).detected
    assert detector.update(rng.normal(0.5, 1.0, size=(200, 8))).detected
