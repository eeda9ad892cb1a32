"""The one contract every genmon detector follows (drift, bias, anomaly, quality).

A detector is pure computation: no I/O, no clocks, no global state.

- Hyperparameters are public constructor attributes, validated in ``__init__``
  with :class:`~genmon.detectors.exceptions.InvalidParameterError`.
- Private state lives only in attributes set by :meth:`Detector.reset`; the
  constructor calls ``reset()`` last, so "new" and "reset" are the same state.
- :meth:`Detector.update` takes a *batch* (vectorised) and returns a frozen
  :class:`DetectorResult`.
- :meth:`Detector.state_dict` / :meth:`Detector.from_state` round-trip through
  JSON (``json.dumps`` must accept the dict) so Faust tables can hold it; no pickle.
  Each class states its own :attr:`Detector.state_version`: bump it when that class's
  state layout changes, and stored states of that detector alone stop loading
  (:class:`~genmon.detectors.exceptions.StateError`; the worker starts that series
  afresh) while every other detector's state still loads.

Subclasses implement ``reset``, ``update``, ``_get_state`` and ``_set_state`` and
declare ``name`` and ``kind``; ``@register`` puts them in :data:`REGISTRY`. Copy
:mod:`genmon.detectors.anomaly.threshold` (the simplest detector) to start a new one.
"""

from __future__ import annotations

import abc
import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self, TypeVar

from genmon.detectors.exceptions import InvalidParameterError, StateError

if TYPE_CHECKING:
    import numpy as np


class DetectorKind(StrEnum):
    DRIFT = "drift"
    BIAS = "bias"
    ANOMALY = "anomaly"
    QUALITY = "quality"


@dataclass(frozen=True, slots=True)
class Interval:
    """A confidence interval."""

    low: float
    high: float


@dataclass(frozen=True, slots=True)
class SegmentEvidence:
    """One segment's rate against its comparison group (bias, A/B)."""

    segment: str
    rate: float
    rate_ci: Interval
    baseline_rate: float
    baseline_ci: Interval
    n: int
    baseline_n: int
    test: str
    p_value: float
    q_value: float | None = None
    difference: float = 0.0
    ratio: float = 1.0
    flagged: bool = False


@dataclass(frozen=True, slots=True)
class ExampleCluster:
    """A cluster of affected examples, largest first, with representatives."""

    size: int
    representatives: tuple[str, ...]
    centroid_distance: float = 0.0


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a detector saw. Every field is optional; detectors fill what applies.

    ``values`` holds named scalars (for example ``("psi", 0.31)``) so the shape stays
    flat and typed rather than a nested dict.
    """

    segment: str | None = None
    test: str | None = None
    dimensions: tuple[int, ...] = ()
    segments: tuple[SegmentEvidence, ...] = ()
    clusters: tuple[ExampleCluster, ...] = ()
    values: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()

    def value(self, key: str, default: float | None = None) -> float | None:
        return dict(self.values).get(key, default)


@dataclass(frozen=True, slots=True)
class DetectorResult:
    """The typed outcome of one ``update()``."""

    detector: str
    kind: DetectorKind
    score: float
    threshold: float
    detected: bool
    n_seen: int
    p_value: float | None = None
    effect_size: float | None = None
    evidence: Evidence = field(default_factory=Evidence)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats become None)."""
        return _json_safe(asdict(self))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, StrEnum):
        return obj.value
    return obj


class ContractExample(NamedTuple):
    """What ``tests/detectors/test_contract.py`` needs to exercise one detector class.

    ``stream(rng, n)`` and ``shifted(rng, n)`` return one batch of ``n`` observations in
    whatever form ``update()`` takes. ``stream`` is stationary (it matches the detector's
    reference, if any); ``shifted`` is a stream the detector must flag soon after
    ``warmup`` observations; no result with ``n_seen < warmup`` may flag. ``invalid``
    lists constructor-argument overrides that must raise ``InvalidParameterError``
    (the contract test also tries NaN for every float hyperparameter).
    """

    detector: Detector
    stream: Callable[[np.random.Generator, int], Any]
    shifted: Callable[[np.random.Generator, int], Any]
    warmup: int = 0
    invalid: tuple[dict[str, Any], ...] = ()


class Detector(abc.ABC):
    """Base class of every detector; see the module docstring for the contract."""

    name: ClassVar[str]
    kind: ClassVar[DetectorKind]
    #: Version of this class's state layout (``state_dict()["format"]``): bumped when the
    #: layout changes incompatibly, which invalidates stored states of this detector only.
    state_version: ClassVar[int] = 1

    # -- the parts a subclass writes ------------------------------------------------
    @abc.abstractmethod
    def reset(self) -> None:
        """Set every private state attribute to its initial value (the only place that does)."""

    @abc.abstractmethod
    def update(self, batch: Any) -> DetectorResult:
        """Consume a batch of observations and say whether a change is detected."""

    @abc.abstractmethod
    def _get_state(self) -> dict[str, Any]:
        """Private state as JSON-serialisable values (lists, not arrays)."""

    @abc.abstractmethod
    def _set_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_get_state`."""

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        """A small valid instance and its streams, for the contract test.

        With ``constant`` given, ``stream`` must yield only that value (mapped to the
        detector's input type, e.g. a constant vector or category) and the instance's
        reference, if any, must be built from it too, so that it must never fire.
        """
        raise NotImplementedError(
            f"{cls.__name__} must implement the classmethod _contract_example() so the "
            "contract test can exercise it (see ContractExample)"
        )

    # -- shared machinery -------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Hyperparameters: the constructor arguments, read back from public attributes."""
        return {name: _to_jsonable(getattr(self, name)) for name in _param_names(type(self))}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this detector, as a JSON-serialisable dict."""
        return {
            "detector": self.name,
            "format": self.state_version,
            "params": self.get_params(),
            "state": self._get_state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        """Rebuild a detector from :meth:`state_dict` (also accepts its JSON text)."""
        if isinstance(state, str | bytes):
            state = json.loads(state)
        if state.get("detector") != cls.name:
            raise StateError(
                f"state belongs to detector {state.get('detector')!r}, not {cls.name!r}; "
                "use genmon.detectors.load_state() to pick the class from the state"
            )
        if state.get("format") != cls.state_version:
            raise StateError(
                f"{cls.name} state has format {state.get('format')!r}, this genmon reads"
                f" {cls.state_version}; re-create the detector from its parameters"
            )
        detector = cls(**state["params"])
        detector._set_state(state["state"])
        return detector

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses -------------------------------------------------------
    def _result(self, **kwargs: Any) -> DetectorResult:
        return DetectorResult(detector=self.name, kind=self.kind, **kwargs)


@functools.cache
def _param_names(cls: type) -> tuple[str, ...]:
    """The constructor's parameter names (read once per class: ``inspect`` is slow, and
    every stored state asks)."""
    return tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")  # type: ignore[misc]


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def check_param(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`InvalidParameterError` unless ``low <= value <= high`` (or open bounds)."""
    bad = False
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad or (isinstance(value, float) and math.isnan(value)):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        brackets = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise InvalidParameterError(
            f"{name}={value!r} is out of range; choose a value in {brackets}"
        )


#: name -> detector class, filled by :func:`register`.
REGISTRY: dict[str, type[Detector]] = {}

D = TypeVar("D", bound=type[Detector])


def register(cls: D) -> D:
    """Class decorator adding a detector to :data:`REGISTRY` under its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise InvalidParameterError(f"detector name {cls.name!r} is registered twice; rename one")
    REGISTRY[cls.name] = cls
    return cls


def load_state(state: dict[str, Any] | str | bytes) -> Detector:
    """Rebuild any registered detector from its ``state_dict``."""
    data: dict[str, Any] = json.loads(state) if isinstance(state, str | bytes) else state
    try:
        cls = REGISTRY[data["detector"]]
    except KeyError as exc:
        raise StateError(
            f"no registered detector named {data.get('detector')!r}; "
            "import the module that defines it before loading its state"
        ) from exc
    return cls.from_state(data)
