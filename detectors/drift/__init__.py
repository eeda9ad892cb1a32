"""detectors/drift."""
