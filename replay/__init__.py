"""``genmon replay``: the worker's own code over a recorded stream, on event time.

:mod:`~genmon.replay.engine` feeds JSON lines through ingest validation, the window state,
the detector runner, the embedding sampler and the incident manager, with timers driven by
event time, and reports what would have paged and when. It depends on ``streams`` and
``incidents`` (it runs their code) and nothing depends on it but the command line.
"""
