"""The pure, Faust-free per-partition window state of the worker.

:class:`~genmon.streams.windows.state.WindowState` aggregates validated events into panes
(:mod:`.stats`, :mod:`.aggregates`, :mod:`.plan`), joins feedback to its inference
(:mod:`.join`, twin of the native join table), keeps examples (:mod:`.exemplars`), caps
segment cardinality (:mod:`.segment_cap`), counts quality signals (:mod:`.quality_signals`)
and closes windows (:mod:`.closing`), over the small key-value interface of :mod:`.store`
with what each partition holds in memory in :mod:`.partition`. Tests and ``genmon replay``
run it on a dict; the worker (:mod:`genmon.streams.pipeline`) on a Faust table.
"""
