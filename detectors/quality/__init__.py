"""detectors/quality."""
