"""Replayable LLM traffic built from real production traces (see :mod:`bench.replay.traffic`).

:mod:`~bench.replay.traffic` builds the streams (and re-exports the rest), from
:mod:`~bench.replay.sources`, :mod:`~bench.replay.latency` and :mod:`~bench.replay.events`;
:mod:`~bench.replay.changes` injects known changes.

Nothing is imported here, so that ``python -m bench.replay.traffic`` runs the module once.
"""
