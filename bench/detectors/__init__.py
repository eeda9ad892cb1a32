"""Detector benchmarks: ``python -m bench.detectors [--quick] [--only SECTION ...]``.

Each section is a module in this package (not starting with ``_``) exposing
``run(quick: bool) -> list[dict]``; the harness runs them in name order and prints one
table per section (rows are dicts; columns are the union of their keys).
"""
