"""Detectors: pure computation over batches of observations (no I/O).

>>> from genmon.detectors import REGISTRY
>>> "threshold" in REGISTRY
True
"""

from genmon.detectors._base import (
    REGISTRY,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    ExampleCluster,
    Interval,
    SegmentEvidence,
    load_state,
    register,
)
from genmon.detectors._threshold import ThresholdDetector
from genmon.detectors.exceptions import (
    DetectorError,
    InputError,
    InvalidParameterError,
    NotFittedError,
    StateError,
)

__all__ = [
    "REGISTRY",
    "Detector",
    "DetectorError",
    "DetectorKind",
    "DetectorResult",
    "Evidence",
    "ExampleCluster",
    "InputError",
    "Interval",
    "InvalidParameterError",
    "NotFittedError",
    "SegmentEvidence",
    "StateError",
    "ThresholdDetector",
    "load_state",
    "register",
]
