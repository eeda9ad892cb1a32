"""The detector contract (genmon/detectors/_base.py), checked on every registered detector.

Every module under ``genmon.detectors`` is imported first, so a new detector is covered
as soon as it registers; each class supplies its own small instance and streams through
``Detector._contract_example`` (see ``ContractExample``).
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import pkgutil
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import genmon.detectors
from genmon.detectors import (
    REGISTRY,
    ContractExample,
    Detector,
    InvalidParameterError,
    StateError,
    load_state,
)


def _import_all() -> list[ModuleType]:
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(genmon.detectors.__path__, "genmon.detectors.")
    ]


MODULES = _import_all()
CLASSES = sorted(REGISTRY.values(), key=lambda cls: cls.name)


def _example(cls: type[Detector], constant: float | None = None) -> ContractExample:
    # Optional backends (alibi-detect) are exercised where their extra is installed.
    requires = getattr(cls, "requires", None)
    if requires:
        pytest.importorskip(requires)
        try:
            return cls._contract_example(constant=constant)
        except InvalidParameterError:
            if constant is None:
                raise
            pytest.skip(f"{cls.__name__}: the optional backend refuses a constant reference")
    return cls._contract_example(constant=constant)


def _feed(detector: Detector, make: Any, rng: np.random.Generator, sizes: list[int]) -> list:
    return [detector.update(make(rng, n)).to_dict() for n in sizes]


@pytest.fixture(params=CLASSES, ids=lambda cls: cls.name)
def cls(request: pytest.FixtureRequest) -> type[Detector]:
    return request.param


def test_every_module_imports_and_something_registered() -> None:
    assert len(MODULES) > 5
    assert {"threshold", "online_mmd", "ks_drift"} <= set(REGISTRY)


def test_state_round_trip_mid_stream_gives_identical_future(cls: type[Detector]) -> None:
    ex = _example(cls)
    rng = np.random.default_rng(7)
    _feed(ex.detector, ex.stream, rng, [ex.warmup + 3, 5, 8])
    _feed(ex.detector, ex.shifted, rng, [3])
    snapshot = json.loads(json.dumps(ex.detector.state_dict()))
    restored = load_state(snapshot)
    assert type(restored) is cls
    assert restored.state_dict() == snapshot
    future = [(ex.stream, 7), (ex.shifted, 4), (ex.shifted, 11), (ex.stream, 6)]
    batches = [make(np.random.default_rng(i), n) for i, (make, n) in enumerate(future)]
    assert [ex.detector.update(b).to_dict() for b in batches] == [
        restored.update(b).to_dict() for b in batches
    ]


def test_a_state_version_bump_invalidates_only_that_detectors_state(
    cls: type[Detector], monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = _example(cls)
    _feed(ex.detector, ex.stream, np.random.default_rng(3), [ex.warmup + 3])
    stored = json.loads(json.dumps(ex.detector.state_dict()))
    other = REGISTRY["ks_drift" if cls.name == "threshold" else "threshold"]
    other_stored = _example(other).detector.state_dict()

    monkeypatch.setattr(cls, "state_version", cls.state_version + 1)
    with pytest.raises(StateError, match=f"{cls.name} state has format"):
        load_state(stored)
    assert type(load_state(other_stored)) is other  # untouched by the bump
    assert load_state(ex.detector.state_dict()).state_dict()["format"] == cls.state_version


def test_reset_equals_a_fresh_instance(cls: type[Detector]) -> None:
    ex = _example(cls)
    rng = np.random.default_rng(3)
    _feed(ex.detector, ex.stream, rng, [ex.warmup + 2, 4])
    _feed(ex.detector, ex.shifted, rng, [ex.warmup + 5])
    ex.detector.reset()
    fresh = cls(**json.loads(json.dumps(ex.detector.get_params())))
    assert ex.detector.state_dict() == fresh.state_dict()
    batches = [ex.shifted(np.random.default_rng(i), ex.warmup + i) for i in range(1, 4)]
    assert [ex.detector.update(b).to_dict() for b in batches] == [
        fresh.update(b).to_dict() for b in batches
    ]


def test_no_alarm_during_warmup_then_shift_is_flagged(cls: type[Detector]) -> None:
    ex = _example(cls)
    rng = np.random.default_rng(11)
    result = ex.detector.update(ex.shifted(rng, 1))
    while result.n_seen < ex.warmup:
        assert not result.detected, f"fired at n_seen={result.n_seen} < warmup={ex.warmup}"
        result = ex.detector.update(ex.shifted(rng, 1))
    flagged = result.detected
    for _ in range(100):
        if flagged:
            break
        flagged = ex.detector.update(ex.shifted(rng, 10)).detected
    assert flagged, "a clearly shifted stream was never flagged after warm-up"


def test_results_are_typed_and_json_safe(cls: type[Detector]) -> None:
    ex = _example(cls)
    result = ex.detector.update(ex.stream(np.random.default_rng(5), ex.warmup + 10))
    assert result.detector == cls.name and result.kind == cls.kind
    assert isinstance(result.detected, bool)
    json.dumps(result.to_dict())


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    constant=st.floats(-1e3, 1e3, allow_nan=False),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
)
def test_constant_stream_never_alarms(
    cls: type[Detector], constant: float, sizes: list[int]
) -> None:
    ex = _example(cls, constant=constant)
    rng = np.random.default_rng(0)
    results = _feed(ex.detector, ex.stream, rng, [ex.warmup + 1, *sizes, ex.warmup + 1])
    assert not any(r["detected"] for r in results), results


def test_invalid_hyperparameters_raise(cls: type[Detector]) -> None:
    ex = _example(cls)
    params = json.loads(json.dumps(ex.detector.get_params()))
    bad: list[dict[str, Any]] = list(ex.invalid)
    bad += [{k: math.nan} for k, v in params.items() if isinstance(v, float)]
    assert bad, f"{cls.__name__} has no float hyperparameter: list invalid overrides"
    for override in bad:
        with pytest.raises(InvalidParameterError):
            cls(**{**params, **override})


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_doctests(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
