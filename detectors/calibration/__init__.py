"""How the default detectors are calibrated: pure computation, no I/O.

- :mod:`~genmon.detectors.calibration.budget`: the false-alarm budget in time
  (``detectors.false_pages_per_week``) split into each default test's share;
- :mod:`~genmon.detectors.calibration.baselines`: each model's learned baselines (rates,
  latency quantiles) that its windows are judged against;
- :mod:`~genmon.detectors.calibration.signals`: the default signals of a window (what each
  counts, how its pages are titled and ranked).
"""
