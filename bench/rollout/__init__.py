"""Safe rollout benchmark: the sequential watch against fixed-horizon tests of the same data.

    .venv/bin/python -m bench.rollout [--replays 1000] [--json]

See :mod:`bench.rollout.replays` for what is measured and :mod:`bench.rollout.simulate`
for the traffic.
"""
