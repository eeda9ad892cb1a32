"""Training throughput benchmark: genmon's SFT, KTO and DPO trainers against a plain loop.

    .venv/bin/python -m bench.retrain [--steps 30] [--repeats 5] [--json] [--out DIR]
    .venv/bin/python bench/retrain/gpu.py --out DIR        # on a GPU (~0.5B model, bf16)
    .venv/bin/python bench/retrain/gpu.py --cpu-smoke --out DIR

See :mod:`bench.retrain.run` (CPU, the tiny model), :mod:`bench.retrain.plain` (the
baseline loops) and ``bench/retrain/gpu.py`` (the standalone GPU script, MFU).
"""
