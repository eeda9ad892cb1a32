"""Failover after a worker's SIGKILL: ``bench/failover/run.py``, results in BENCHMARKS.md."""
