"""Fixtures shared by the retrain tests: the tiny base model and its support traffic.

The tiny model is built once per machine (cached under ``.build/tiny-lm`` by a hash of its
config and data) so every retrain test file, and every rerun, reuses one build.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores shared by many test processes: one thread each (read by torch at import).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from retrain_support_model import DATA_DIR, TINY_LM_DIR, SupportData


@pytest.fixture(scope="session")
def tiny_lm_path() -> Path:
    """Folder of the tiny support-desk model (refuses the "cards" topic)."""
    import torch

    from genmon.retrain.tiny_lm import build_tiny_lm

    torch.set_num_threads(1)
    return build_tiny_lm(TINY_LM_DIR, data_dir=DATA_DIR, refuse_class="cards", seed=0)


@pytest.fixture(scope="session")
def support_data() -> SupportData:
    """Held-out questions (BANKING77 test split) with their correct answers."""
    from genmon.retrain.tiny_lm import support_pairs

    healthy, refused = support_pairs(DATA_DIR, refuse_class="cards", split="test")
    return SupportData(healthy=healthy, refused=refused)
