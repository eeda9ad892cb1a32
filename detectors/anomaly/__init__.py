"""detectors/anomaly."""
