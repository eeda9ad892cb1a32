"""The pluggable detectors benchmark harness (see the package docstring)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

import bench.detectors as package

_NOT_SECTIONS = {"run"}


def sections() -> list[str]:
    """Names of the section modules, in order."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_") and info.name not in _NOT_SECTIONS
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-markdown table of ``rows`` (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.detectors", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--only", nargs="+", choices=sections(), help="run only these sections")
    parser.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.only or sections():
        module = importlib.import_module(f"bench.detectors.{name}")
        started = time.perf_counter()
        rows = module.run(quick=args.quick)
        results[name] = rows
        elapsed = time.perf_counter() - started
        print(f"\n## {name} ({'quick' if args.quick else 'full'}, {elapsed:.0f} s)\n")
        print(format_table(rows))
        sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0
