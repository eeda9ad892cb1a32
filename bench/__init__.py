"""Benchmarks (not tests): ``python -m bench.<area>``; results go to BENCHMARKS.md."""
