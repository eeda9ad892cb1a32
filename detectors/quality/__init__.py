"""Output-quality detectors: empty/truncated, refusals, length, language, relevance, attacks."""

from genmon.detectors.quality.empty_truncated import EmptyTruncatedRateDetector, classify_response
from genmon.detectors.quality.injection import (
    INJECTION_MARKERS,
    InjectionMarker,
    InjectionRateDetector,
    injection_markers,
)
from genmon.detectors.quality.language import LanguageShiftDetector, detect_script
from genmon.detectors.quality.length_shift import LengthShiftDetector
from genmon.detectors.quality.refusal import RefusalRateDetector, is_refusal
from genmon.detectors.quality.refusal_phrases import RefusalPhrases
from genmon.detectors.quality.relevance import RelevanceDetector, pair_similarity

__all__ = [
    "INJECTION_MARKERS",
    "EmptyTruncatedRateDetector",
    "InjectionMarker",
    "InjectionRateDetector",
    "LanguageShiftDetector",
    "LengthShiftDetector",
    "RefusalPhrases",
    "RefusalRateDetector",
    "RelevanceDetector",
    "classify_response",
    "detect_script",
    "injection_markers",
    "is_refusal",
    "pair_similarity",
]
