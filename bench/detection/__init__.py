"""Detection benchmark: genmon against the old fixed thresholds and River's ADWIN and
PageHinkley on the same streams (see :mod:`bench.detection.__main__`)."""
