"""`pip install genmon` with no extras is the SDK: a pure-Python wheel that compiles
nothing, installs without cargo, sends events to the real broker, and loads neither the
worker (Faust, genmon.streams), nor torch, nor the native module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from kafka_support import consume

from bench.install.run import build_wheel, wheel_rooms
from genmon.infra.kafka import KafkaBroker
from genmon.schemas.codec import decode
from genmon.schemas.events import InferenceEvent
from genmon.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
#: The most the base install may add to a fresh virtualenv (genmon and its dependencies).
MAX_INSTALL_BYTES = 30 * 1024 * 1024
#: Modules the SDK must never load: the worker, the model stack, the native module.
HEAVY = ("torch", "faust", "aiokafka", "numpy", "sqlalchemy", "genmon.streams", "genmon_native")

SDK_SCRIPT = f"""
import json, sys
from genmon import Monitor
with Monitor() as monitor:
    for i in range(20):
        monitor.log_inference(model_id="light", latency_ms=i, request_id=f"r{{i}}")
    assert monitor.flush(timeout=60)
heavy = {HEAVY!r}
print(json.dumps(sorted(
    name for name in sys.modules if any(name == h or name.startswith(h + ".") for h in heavy)
)))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("build"))


def test_the_dockerfile_copies_every_room_the_wheel_is_built_from() -> None:
    rooms = wheel_rooms()
    copied = {
        line.split()[1].rstrip("/")
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert rooms <= copied, rooms - copied


def _no_cargo_path() -> str:
    """PATH without any folder that holds cargo or rustc."""
    folders = [
        folder
        for folder in os.environ.get("PATH", "").split(os.pathsep)
        if folder and not any(Path(folder, tool).exists() for tool in ("cargo", "rustc"))
    ]
    return os.pathsep.join(folders)


def test_the_wheel_is_pure_python_and_carries_every_room(wheel: Path) -> None:
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    for room in ("schemas", "detectors", "streams", "incidents", "replay", "cli", "infra"):
        assert f"genmon/{room}/__init__.py" in names, room
    assert "genmon/detectors/calibration/defaults.yaml" in names  # the shipped detector plan
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.split(">")[0].split("=")[0].split("[")[0] in {
        "torch", "faust-streaming", "sentence-transformers", "numpy", "sqlmodel", "genmon-native"
    }], base  # fmt: skip


@pytest.mark.kafka
@pytest.mark.slow
def test_the_base_install_is_a_light_sdk_that_reaches_the_broker(
    wheel: Path, tmp_path: Path, kafka_settings: Settings, unique_name: str
) -> None:
    path = _no_cargo_path()
    assert shutil.which("cargo", path=path) is None
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{path}"}
    env.pop("PYTHONPATH", None)
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, env=env,
        ).stdout.strip()
    )  # fmt: skip
    before = _bytes_under(site)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=600,
        env=env,
    )
    added = _bytes_under(site) - before
    assert added <= MAX_INSTALL_BYTES, f"the base install adds {added / 2**20:.1f} MB"

    settings = kafka_settings.model_copy(
        update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})}
    )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    sdk_env = {
        **env,
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
    }
    done = subprocess.run(
        [python, "-c", SDK_SCRIPT],
        check=True, capture_output=True, text=True, timeout=180, env=sdk_env, cwd=tmp_path,
    )  # fmt: skip
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the SDK loaded {loaded}"
    records = consume(settings, settings.topic("inference"), expected=20)
    events = [decode(record.value, InferenceEvent) for record in records]
    assert sorted(e.request_id for e in events) == sorted(f"r{i}" for i in range(20))
    assert {e.model_id for e in events} == {"light"}

    # The command line starts on the base install too.
    cli = subprocess.run(
        [venv / "bin" / "genmon", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert cli.returncode == 0 and "worker" in cli.stdout, cli.stderr


def _bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
