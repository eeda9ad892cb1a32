"""detectors/bias."""
