"""One online drift detector on one stream, in its own process (so peak RSS is its own).

Run by ``bench/detectors/embedding_drift.py``: ``python -m bench.detectors._drift_worker
'<json config>'``; prints one JSON row. The stream file (.npz) holds ``reference``,
``stationary`` and ``shifted`` pools, disjoint from each other.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Pool:
    """Draws without replacement, reshuffling when exhausted (no repeats inside a window)."""

    def __init__(self, data: np.ndarray, rng: np.random.Generator) -> None:
        self.data, self.rng, self.order, self.pos = data, rng, rng.permutation(len(data)), 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.data)), 0
            k = min(n, len(self.order) - self.pos)
            out.append(self.data[self.order[self.pos : self.pos + k]])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(out)


def _first_alarm(detector: Any, stream: np.ndarray, step: int) -> int:
    """Index of the first alarm in ``stream`` (fed ``step`` rows at a time), or -1."""
    for start in range(0, len(stream), step):
        result = detector.update(stream[start : start + step])
        if result.detected:
            return start + int(result.evidence.value("first_detection_index"))
    return -1


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg["detector"].startswith("alibi"):
        import torch

        torch.set_num_threads(1)
        import genmon.detectors.backends.alibi  # noqa: F401 - registers the alibi classes
    from genmon.detectors import REGISTRY

    data = np.load(cfg["data"])
    reference = data["reference"].astype(np.float32)
    rng = np.random.default_rng(cfg["seed"])
    stationary = _Pool(data["stationary"].astype(np.float32), rng)
    shifted = _Pool(data["shifted"].astype(np.float32), rng)
    rss_base = _rss_mb()

    started = time.perf_counter()
    detector = REGISTRY[cfg["detector"]](
        reference,
        window_size=cfg["window_size"],
        ert=cfg["ert"],
        n_bootstraps=cfg["n_bootstraps"],
        seed=cfg["seed"],
    )
    config_s = time.perf_counter() - started

    stream = stationary.take(cfg["n_stationary"])
    alarms = 0
    started = time.perf_counter()
    for start in range(0, len(stream), cfg["batch"]):
        result = detector.update(stream[start : start + cfg["batch"]])
        alarms += int(result.evidence.value("detections"))
    update_s = time.perf_counter() - started

    delays, early, missed = [], 0, 0
    for _ in range(cfg["n_trials"]):
        detector.reset()
        trial = np.concatenate([stationary.take(cfg["pre"]), shifted.take(cfg["max_delay"])])
        alarm = _first_alarm(detector, trial, 50)
        if alarm < 0:
            missed += 1
        elif alarm < cfg["pre"]:
            early += 1
        else:
            delays.append(alarm - cfg["pre"] + 1)

    n = cfg["n_stationary"]
    print(
        json.dumps(
            {
                "config_s": config_s,
                "updates_per_s": n / update_s,
                "rss_base_mb": rss_base,
                "rss_peak_mb": _rss_mb(),
                "false_alarms_per_10k": alarms * 10_000 / n,
                "mean_run_length": n / alarms if alarms else None,
                "mean_delay": float(np.mean(delays)) if delays else None,
                "median_delay": float(np.median(delays)) if delays else None,
                "trials": f"{len(delays)} ok / {early} early / {missed} missed",
            }
        )
    )


if __name__ == "__main__":
    main()
