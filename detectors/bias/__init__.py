"""Bias detectors (segment rate gaps, equal opportunity) and A/B / canary comparison."""

from genmon.detectors.bias._inputs import (
    ConfusionCounts,
    LabeledObservations,
    SegmentCounts,
    SegmentObservations,
)
from genmon.detectors.bias.ab_latency import ABLatencyDetector, LatencyObservations
from genmon.detectors.bias.ab_rate import ABRateDetector
from genmon.detectors.bias.equal_opportunity import EqualOpportunityDetector
from genmon.detectors.bias.segment_rate import SegmentRateBiasDetector

__all__ = [
    "ABLatencyDetector",
    "ABRateDetector",
    "ConfusionCounts",
    "EqualOpportunityDetector",
    "LabeledObservations",
    "LatencyObservations",
    "SegmentCounts",
    "SegmentObservations",
    "SegmentRateBiasDetector",
]
