"""docs/architecture.md stays true: every file and symbol it names exists, every topic and
table it names is genmon's, and the rooms depend on each other only the one way it draws."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from genmon.settings import INTERNAL_TOPIC_KINDS, TOPIC_KINDS

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"

#: Folder of each room -> its package: pyproject.toml's package-dir, and the CLI (a room of
#: its own inside the core, listed first so that its modules are not the core's).
ROOMS = {
    "genmon/cli": "genmon.cli",
    **{
        folder: package
        for package, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
            "setuptools"
        ]["package-dir"].items()
        if package != "genmon"
    },
    "genmon": "genmon",  # the core: settings, exceptions, the SDK, the database helpers
}
#: What each room may import (besides itself): data flows one way, schemas <- detectors <-
#: streams and incidents -> retrain; replay runs the worker's code; the CLI drives them all.
ALLOWED = {
    "core": {"schemas"},
    "schemas": {"core"},
    "detectors": {"core", "schemas"},
    "incidents": {"core", "schemas"},
    "infra": {"core"},
    "streams": {"core", "schemas", "detectors", "incidents", "infra"},
    "retrain": {"core", "schemas", "detectors", "incidents", "infra"},
    "replay": {"core", "schemas", "detectors", "streams", "incidents"},
    "privacy": {"core", "schemas", "incidents", "retrain", "infra"},
    "scheduler": {"core", "schemas", "incidents", "retrain", "privacy", "infra"},
    "api": {"core", "schemas", "incidents", "retrain", "privacy", "infra"},
    "cli": {
        "core",
        *("schemas", "detectors", "streams", "incidents", "infra", "replay", "retrain"),
        *("privacy", "scheduler", "api"),
    },
}
KAFKA = {"kafka", "aiokafka", "faust", "mode"}
#: Third-party packages the SDK (`pip install genmon`, no extras) must never load.
NOT_IN_THE_SDK = KAFKA - {"kafka"} | {"torch", "sentence_transformers", "numpy", "genmon_native"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "genmon":
        return None
    if len(parts) > 1 and parts[1] in {"cli", *(p.rsplit(".", 1)[-1] for p in ROOMS.values())}:
        return parts[1] if parts[1] != "genmon" else "core"
    return "core"


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found: dict[str, Path] = {}
    for folder, package in ROOMS.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            if folder == "genmon" and relative.parts[0] == "cli":
                continue
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(module: str, names: set[str]) -> list[str]:
    """The imports of ``module`` (in any function too) that break the one-way rule."""
    room = _room(module)
    assert room is not None
    broken = []
    for name in sorted(names):
        target = _room(name)
        if target is not None and target != room and target not in ALLOWED[room]:
            broken.append(f"{module} ({room}) imports {name} ({target})")
        if room in {"schemas", "detectors"} and name.split(".")[0] in KAFKA:
            broken.append(f"{module} ({room}) imports {name}: pure rooms stay off Kafka")
    return broken


def test_every_room_imports_only_what_the_one_way_rule_allows() -> None:
    assert len(MODULES) > 80
    broken = [v for module, path in MODULES.items() for v in _violations(module, _imports(path))]
    assert broken == []


def test_the_sdk_reaches_no_worker_module() -> None:
    """What `from genmon import Monitor` loads, followed through module-level imports."""
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = ["genmon", "genmon.sdk"]
    while todo:
        module = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        for name in _imports(MODULES[module], top_level_only=True):
            if name.startswith("genmon"):
                todo += [name, name.rsplit(".", 1)[0]]
            else:
                third_party.add(name.split(".")[0])
    assert {m for m in seen if _room(m) not in {"core", "schemas"}} == set()
    assert third_party & NOT_IN_THE_SDK == set()
    assert "genmon.schemas.codec" in seen  # the wire codec the SDK uses lives in schemas


def test_the_rule_catches_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import faust\n\ndef late():\n    from genmon.streams.app import create_app\n")
    found = _violations("genmon.detectors.bad", _imports(bad))
    assert "imports faust: pure rooms stay off Kafka" in found[0]
    assert "imports genmon.streams.app (streams)" in found[1]
    assert _violations("genmon.incidents.bad", {"genmon.streams.app"}) != []
    assert _violations("genmon.streams.bad", {"genmon.incidents.manager", "faust"}) == []


# --- the page -------------------------------------------------------------------------


def _page() -> str:
    return PAGE.read_text()


#: The page's walks, each a table of hops.
WALKS = (
    "From an event to a page",
    "From an incident to a new version",
    "From a new version to the champion",
)


def _hops(walk: str = WALKS[0]) -> list[dict[str, str]]:
    """The rows of one walk (the first table under its heading)."""
    section = _page().split(f"## {walk}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip().lower() for cell in rows[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
        for row in rows[2:]
    ]


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.mark.parametrize("walk", WALKS)
def test_the_walk_has_its_hops(walk: str) -> None:
    hops = _hops(walk)
    assert len(hops) >= 10
    assert {"file", "symbol", "topic or table"} <= set(hops[0])


@pytest.mark.parametrize(
    "hop",
    [hop for walk in WALKS for hop in _hops(walk)],
    ids=lambda hop: f"{hop.get('file', '?')}:{hop.get('#', '?')}",
)
def test_every_hop_names_a_file_and_symbol_that_exist(hop: dict[str, str]) -> None:
    (file,) = _code(hop["file"])
    assert (ROOT / file).is_file(), file
    module = next(name for name, path in MODULES.items() if path == ROOT / file)
    for symbol in _code(hop["symbol"]):
        found: object = importlib.import_module(module)
        for attribute in symbol.split("."):
            found = getattr(found, attribute)  # AttributeError names what went stale


def test_every_topic_and_table_the_page_names_is_genmons() -> None:
    from genmon.db import table_metadata

    tables = set(table_metadata().tables)
    topics = {f"<prefix>.{kind}" for kind in (*TOPIC_KINDS, *INTERNAL_TOPIC_KINDS)}
    named = set(re.findall(r"`(<prefix>\.[\w-]+)`", _page()))
    assert named and named <= topics, named - topics
    assert topics <= named, f"the page does not list {topics - named}"
    listed = set(re.findall(r"table `(\w+)`", _page()))
    assert listed and listed <= tables, listed - tables
    assert tables <= listed, f"the page does not list {tables - listed}"
