"""Detectors: pure computation over batches of observations (no I/O).

>>> from genmon.detectors import REGISTRY
>>> "threshold" in REGISTRY
True
"""

from genmon.detectors._base import (
    REGISTRY,
    ContractExample,
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
from genmon.detectors.anomaly import (
    CUSUM,
    EmbeddingOutlierDetector,
    EWMAZScore,
    PageHinkley,
    RobustZScore,
    SeasonalThroughputDetector,
    ThroughputDetector,
)
from genmon.detectors.bias import (
    ABLatencyDetector,
    ABRateDetector,
    ConfusionCounts,
    EqualOpportunityDetector,
    LabeledObservations,
    LatencyObservations,
    SegmentCounts,
    SegmentObservations,
    SegmentRateBiasDetector,
)
from genmon.detectors.drift import (
    ChiSquareDrift,
    CramerVonMisesDrift,
    EmbeddingKSDrift,
    KSDrift,
    MMDDrift,
    OnlineLSDDDrift,
    OnlineMMDDrift,
    PSIDrift,
    WassersteinDrift,
)
from genmon.detectors.error_analysis import ExampleClusterer, attach_clusters
from genmon.detectors.exceptions import (
    DetectorError,
    InputError,
    InvalidParameterError,
    NotFittedError,
    StateError,
)
from genmon.detectors.quality import (
    EmptyTruncatedRateDetector,
    InjectionRateDetector,
    LanguageShiftDetector,
    LengthShiftDetector,
    RefusalRateDetector,
    RelevanceDetector,
)

__all__ = [
    "CUSUM",
    "REGISTRY",
    "ABLatencyDetector",
    "ABRateDetector",
    "ChiSquareDrift",
    "ConfusionCounts",
    "ContractExample",
    "CramerVonMisesDrift",
    "Detector",
    "DetectorError",
    "DetectorKind",
    "DetectorResult",
    "EWMAZScore",
    "EmbeddingKSDrift",
    "EmbeddingOutlierDetector",
    "EmptyTruncatedRateDetector",
    "EqualOpportunityDetector",
    "Evidence",
    "ExampleCluster",
    "ExampleClusterer",
    "InjectionRateDetector",
    "InputError",
    "Interval",
    "InvalidParameterError",
    "KSDrift",
    "LabeledObservations",
    "LanguageShiftDetector",
    "LatencyObservations",
    "LengthShiftDetector",
    "MMDDrift",
    "NotFittedError",
    "OnlineLSDDDrift",
    "OnlineMMDDrift",
    "PSIDrift",
    "PageHinkley",
    "RefusalRateDetector",
    "RelevanceDetector",
    "RobustZScore",
    "SeasonalThroughputDetector",
    "SegmentCounts",
    "SegmentEvidence",
    "SegmentObservations",
    "SegmentRateBiasDetector",
    "StateError",
    "ThresholdDetector",
    "ThroughputDetector",
    "WassersteinDrift",
    "attach_clusters",
    "load_state",
    "register",
]
