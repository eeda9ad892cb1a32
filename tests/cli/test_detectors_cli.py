"""`genmon detectors list`: the plan per glob or for one model, in users' units; a bad plan
file exits 1 with its lines; the README's tables are what `--markdown` prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from genmon.cli import main
from genmon.cli._common import ExitCode

README = Path(__file__).resolve().parents[2] / "README.md"

PLAN = """\
version: 1
models:
  - match: "*"
    signals:
      error_rate:
        - {detector: rate_cusum, share: 0.5}
  - match: "support-*"
    signals:
      requests:
        - {detector: throughput, share: 0.25, severity: critical}
      latency:
        - {detector: threshold, params: {threshold: 4000}}
"""


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["detectors", "list", *args])
    return result.exit_code, result.output


def test_the_shipped_plan_is_listed_with_its_total() -> None:
    code, out = invoke()
    assert code == ExitCode.OK, out
    lines = out.splitlines()
    assert lines[0].startswith("plan: genmon:defaults.yaml; budget: 1 false page(s)")
    assert "models matching '*' (genmon:defaults.yaml:" in out
    ttft = next(line for line in lines if line.startswith("ttft "))
    assert ttft.split()[:4] == ["ttft", "rate_cusum", "auto", "8%"]
    assert "12.5 weeks" in ttft and "threshold=12.44" in ttft
    assert lines[-1].startswith("total: 17 detectors, shares 100% of the budget: 1 false page(s)")


def test_each_glob_shows_what_a_model_it_matches_gets(tmp_path: Path) -> None:
    path = tmp_path / "detectors.yaml"
    path.write_text(PLAN)
    code, out = invoke("--file", str(path))
    assert code == ExitCode.OK, out
    blocks = out.split("\n\n")[1:]
    assert blocks[0].startswith(f"models matching '*' ({path}:3)")
    assert blocks[1].startswith(f"models matching 'support-*' ({path}:7)")
    assert f"{path}:6" in blocks[1]  # error_rate comes from the '*' block
    threshold = next(line for line in blocks[1].splitlines() if line.startswith("latency "))
    assert "outside" in threshold and "threshold=4000" in threshold
    assert (
        blocks[1]
        .splitlines()[-1]
        .startswith(
            "total: 3 detectors, shares 75% of the budget: 0.75 false page(s) per model-week"
        )
    )
    assert "1 outside the budget" in blocks[1]


def test_one_model_as_json(tmp_path: Path) -> None:
    path = tmp_path / "detectors.yaml"
    path.write_text(PLAN)
    code, out = invoke("--file", str(path), "--model", "support-bot", "--json")
    assert code == ExitCode.OK, out
    doc = json.loads(out)
    assert doc["model_id"] == "support-bot" and doc["file"] == str(path)
    assert doc["total_share"] == 0.75
    rows = {row["signal"]: row for row in doc["detectors"]}
    assert rows["requests"]["severity"] == "critical"
    assert rows["requests"]["hours_between_false_pages"] == 7 * 24 / 0.25
    assert rows["latency"]["inside_budget"] is False
    code, out = invoke("--file", str(path), "--json")
    assert [m["match"] for m in json.loads(out)["models"]] == ["*", "support-*"]


def test_a_bad_plan_exits_1_with_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "detectors.yaml"
    path.write_text(PLAN.replace("{threshold: 4000}", "{threshold: 4000, above: maybe, x: 1}"))
    code, out = invoke("--file", str(path))
    assert code == ExitCode.FAILED
    assert f"{path}:12: models[1].signals.latency[0].params.x: not a parameter of threshold" in out


def test_the_readme_shows_the_shipped_plan_and_the_signals() -> None:
    code, out = invoke("--markdown")
    assert code == ExitCode.OK
    plan, catalog = out.strip().split("\n\n")
    text = README.read_text()
    for name, table in (("detector-defaults", plan), ("signal-catalog", catalog)):
        shown = text.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
        assert shown.strip() == table, (
            f"README's {name} table is stale: regenerate it with `genmon detectors list --markdown`"
        )


def test_replay_refuses_a_bad_plan_before_reading_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genmon.settings import get_settings

    path = tmp_path / "detectors.yaml"
    path.write_text(PLAN.replace("share: 0.25", "share: 0.75"))
    stream = tmp_path / "stream.jsonl"
    stream.write_text("")
    monkeypatch.setenv("GENMON_DETECTORS__CONFIG_FILE", str(path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["replay", str(stream), "--no-embeddings"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == ExitCode.FAILED, result.output
    assert f"{path}:7: models[1].match: a model like 'support-' gets shares summing to 1.25" in (
        result.output
    )
