"""``make faults``: the full-length fault probes, then one table.

Runs the fault tests with full-length outages (``GENMON_FAULTS_FULL=1``: a 133 s broker
stop, a 30 s freeze, a 2-minute PostgreSQL outage, a 120 s receiver outage, a worker
SIGKILL, a hostile mix with NUL bytes) on the real services, and prints per fault what
was sent, validated, windowed, counted late, dead-lettered, stored and paged, with
duplicates, events out of order and losses. ``--json`` prints the rows instead. Exits
non-zero when a test failed.

Usage: ``.venv/bin/python tests/faults/run.py [--json] [pytest args...]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fault_report import COLUMNS  # noqa: E402

#: The tests behind each probe (each records its rows; see tests/faults/report.py).
PROBES = (
    "tests/faults/test_broker_faults.py",
    "tests/streams/test_pipeline_kafka.py::test_restart_after_kill9_continues_aggregates_and_detector_state",
    "tests/streams/test_labelled_examples_outage.py",
    "tests/incidents/test_notify_outage.py",
    "tests/streams/test_hostile_input.py",
)


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    extra = [a for a in argv if a != "--json"]
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as handle:
        report = Path(handle.name)
    env = {**os.environ, "GENMON_FAULTS_FULL": "1", "GENMON_FAULTS_REPORT": str(report)}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *PROBES, *extra]
    code = subprocess.call(command, cwd=ROOT, env=env, stdout=sys.stderr)
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    report.unlink()
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    return code


def table(rows: list[dict[str, object]]) -> str:
    header = ["fault", "outage_s", *COLUMNS]
    cells = [[_cell(row.get(name)) for name in header] for row in rows]
    widths = (
        [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)] if cells else []
    )
    if not cells:
        return "no fault test recorded a row (did the services start? see the pytest output)"
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
