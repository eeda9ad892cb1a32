"""The CPU training benchmark (``python -m bench.retrain``) on a tiny configuration.

Two measured steps per strategy and side: it must write the table and the JSON with
examples/s and tokens/s for genmon's trainers and the plain loop, and count SFT's tokens
identically on both sides (the same batches, the same non-pad tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.retrain.run import main


def test_bench_retrain_writes_the_table(
    tiny_lm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = ["--steps", "3", "--repeats", "1", "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert "| strategy | genmon examples/s | plain examples/s | genmon / plain |" in table
    results = json.loads((out / "results.json").read_text())
    rows = {r["strategy"]: r for r in results["rows"]}
    assert list(rows) == ["sft", "kto", "dpo"]
    for strategy, r in rows.items():
        assert f"| {strategy} |" in table
        for side in ("genmon", "plain"):
            assert r[side]["measured_steps"] == 2, (strategy, side)
            assert r[side]["examples_per_s"] > 0 and r[side]["tokens_per_s"] > 0
        assert r["ratio"] == r["genmon"]["examples_per_s"] / r["plain"]["examples_per_s"]
    # SFT: genmon's loop and the plain one draw the same batches and count alike.
    assert rows["sft"]["genmon"]["tokens_per_step"] == rows["sft"]["plain"]["tokens_per_step"]


def test_too_few_steps_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--steps", "1"]) == 2
    assert "warm-up" in capsys.readouterr().err
