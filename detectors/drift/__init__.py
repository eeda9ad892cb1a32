"""Drift detectors: online embedding drift, windowed two-sample tests, feature drift."""

from genmon.detectors.drift.chi_square import ChiSquareDrift
from genmon.detectors.drift.cvm import CramerVonMisesDrift
from genmon.detectors.drift.embedding_shift import EmbeddingShiftDrift
from genmon.detectors.drift.ks import KSDrift
from genmon.detectors.drift.ks_embedding import EmbeddingKSDrift
from genmon.detectors.drift.mmd import MMDDrift
from genmon.detectors.drift.online_lsdd import OnlineLSDDDrift
from genmon.detectors.drift.online_mmd import OnlineMMDDrift
from genmon.detectors.drift.psi import PSIDrift
from genmon.detectors.drift.wasserstein import WassersteinDrift

__all__ = [
    "ChiSquareDrift",
    "CramerVonMisesDrift",
    "EmbeddingKSDrift",
    "EmbeddingShiftDrift",
    "KSDrift",
    "MMDDrift",
    "OnlineLSDDDrift",
    "OnlineMMDDrift",
    "PSIDrift",
    "WassersteinDrift",
]
