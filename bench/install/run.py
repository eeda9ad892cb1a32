"""Install benchmark: what `pip install genmon` (no extras) costs a service, in MB and ms.

    .venv/bin/python bench/install/run.py              # the recorded run
    .venv/bin/python bench/install/run.py --runs 5     # a quick look

Builds genmon's wheel, installs it with no extras into a fresh virtualenv (no cargo on
PATH: nothing compiles), then measures:

- the bytes the install added to the virtualenv's site-packages (limit 30 MB);
- the wall time of ``python -c "import genmon"`` and of ``from genmon import Monitor``
  (the SDK with its Kafka client), each minus the same interpreter's bare start
  (``python -c pass``), the baseline, measured in the same run, interleaved; the median of
  ``--runs`` (limit 300 ms for ``import genmon``);
- for reference the same two imports in the full development install (``.venv``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MB = 30
LIMIT_IMPORT_MS = 300
BASELINE = "bare start (baseline)"
STATEMENTS = {
    BASELINE: "pass",
    "import genmon": "import genmon",
    "from genmon import Monitor": "from genmon import Monitor",
}


def _run(python: Path, statement: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([python, "-c", statement], check=True, env=env, cwd=tempfile.gettempdir())
    return time.perf_counter() - started


def _medians(python: Path, runs: int, env: dict[str, str]) -> dict[str, float]:
    """Median seconds per statement; the statements alternate within each round."""
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for statement in STATEMENTS.values():
        _run(python, statement, env)  # warm the file cache and the .pyc files
    for _ in range(runs):
        for name, statement in STATEMENTS.items():
            times[name].append(_run(python, statement, env))
    return {name: statistics.median(values) for name, values in times.items()}


def wheel_rooms() -> set[str]:
    """The top folders pyproject.toml's package-dir maps into the ``genmon`` package."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {Path(f).parts[0] for f in project["tool"]["setuptools"]["package-dir"].values()}


def build_wheel(work: Path) -> Path:
    """genmon's wheel, built under ``work`` from a fresh copy of what it is made of
    (pyproject.toml, README.md, the rooms), as the Dockerfile copies them: a ``build/``
    folder left in the checkout by an earlier build cannot leak stale modules into it."""
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "target", "*.so")
    for room in sorted(wheel_rooms()):
        shutil.copytree(ROOT / room, source / room, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source],
        check=True,
        timeout=600,
    )
    (wheel,) = dist.glob("genmon-*.whl")
    return wheel


def _install(work: Path, env: dict[str, str]) -> tuple[Path, int]:
    wheel = build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
            env=env,
        ).strip()
    )
    before = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    subprocess.run([python, "-m", "pip", "install", "-q", wheel], check=True, env=env)
    after = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    return python, after - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    path = os.pathsep.join(
        p
        for p in os.environ["PATH"].split(os.pathsep)
        if p and not Path(p, "cargo").exists() and not Path(p, "rustc").exists()
    )
    assert shutil.which("cargo", path=path) is None
    env = {**os.environ, "PATH": path}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as work:
        python, added = _install(Path(work), env)
        light = _medians(python, args.runs, env)
        full = _medians(ROOT / ".venv" / "bin" / "python", args.runs, env)
    base_light, base_full = light[BASELINE], full[BASELINE]
    print(f"base install adds {added / 2**20:.1f} MB to a fresh virtualenv (limit {LIMIT_MB} MB)")
    print(f"median of {args.runs} runs, ms over the bare interpreter start of the same install")
    print(f"| {'statement':<28} | {'base install':>12} | {'full dev install':>16} |")
    print(f"|{'-' * 30}|{'-' * 14}|{'-' * 18}|")
    for name in STATEMENTS:
        a = (
            (light[name] - base_light) * 1000
            if name != "bare start (baseline)"
            else light[name] * 1000
        )
        b = (
            (full[name] - base_full) * 1000
            if name != "bare start (baseline)"
            else full[name] * 1000
        )
        print(f"| {name:<28} | {a:>12.0f} | {b:>16.0f} |")
    over = (light["import genmon"] - base_light) * 1000
    print(f"import genmon: {over:.0f} ms (limit {LIMIT_IMPORT_MS} ms)")
    if added > LIMIT_MB * 2**20 or over > LIMIT_IMPORT_MS:
        sys.exit(1)


if __name__ == "__main__":
    main()
