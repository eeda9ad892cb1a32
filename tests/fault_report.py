"""What each fault test measured, for the table of ``make faults``.

The fault tests run short by default, within the suite's budget. ``make faults``
(tests/faults/run.py) runs them with ``GENMON_FAULTS_FULL=1``: full-length outages as
the fault report measured them (a 133 s broker stop, a 2-minute PostgreSQL outage, ...),
each test appending one row per fault to the JSON-lines file ``GENMON_FAULTS_REPORT``.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The columns of the table, in order; a fault fills those that apply to it.
COLUMNS = (
    "sent",
    "validated",
    "windowed",
    "late",
    "dead_lettered",
    "stored",
    "pages_delivered",
    "duplicates",
    "out_of_order",
    "lost",
)


def full_length() -> bool:
    """True under ``make faults``: outages as long as the ones users reported."""
    return os.environ.get("GENMON_FAULTS_FULL") == "1"


def pick(short: float, full: float) -> float:
    """``full`` under ``make faults``, else ``short``."""
    return full if full_length() else short


def record(fault: str, **counts: Any) -> None:
    """Append one row (``fault`` and some of :data:`COLUMNS`) to the report, if asked for."""
    path = os.environ.get("GENMON_FAULTS_REPORT")
    if not path:
        return
    unknown = set(counts) - set(COLUMNS) - {"outage_s", "exact"}
    assert not unknown, f"not a column of the fault table: {sorted(unknown)}"
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"fault": fault, **counts}) + "\n")
