"""Anomaly detectors: spikes and sustained shifts in rates, latencies, throughput, embeddings."""

from genmon.detectors.anomaly.cusum import CUSUM
from genmon.detectors.anomaly.embedding_outlier import EmbeddingOutlierDetector
from genmon.detectors.anomaly.ewma import EWMAZScore
from genmon.detectors.anomaly.page_hinkley import PageHinkley
from genmon.detectors.anomaly.rate_cusum import RateCUSUM, RateWindow
from genmon.detectors.anomaly.robust_zscore import RobustZScore
from genmon.detectors.anomaly.seasonal import SeasonalThroughputDetector
from genmon.detectors.anomaly.threshold import ThresholdDetector
from genmon.detectors.anomaly.throughput import ThroughputDetector

__all__ = [
    "CUSUM",
    "EWMAZScore",
    "EmbeddingOutlierDetector",
    "PageHinkley",
    "RateCUSUM",
    "RateWindow",
    "RobustZScore",
    "SeasonalThroughputDetector",
    "ThresholdDetector",
    "ThroughputDetector",
]
