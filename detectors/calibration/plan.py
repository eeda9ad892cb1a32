"""The detector plan: which detectors run on which signals of which models, with what
parameters, severity and share of the false-alarm budget (``detectors.config_file``).

The file (YAML; genmon's own is ``defaults.yaml`` beside this module)::

    version: 1
    models:
      - match: "*"                  # fnmatch glob on the model id
        signals:
          error_rate:               # a signal of the catalog (genmon.detectors.calibration.catalog)
            - detector: rate_cusum  # a registered detector that fits the signal
              share: 0.1            # of detectors.false_pages_per_week; 0: outside the budget
              severity: auto        # auto (from effect size) | warning | error | critical
              params: {}            # constructor arguments; the budget sets the calibrated ones
      - match: "support-*"
        signals:
          error_rate: []            # none for these models

**Which entries a model gets.** Every block whose ``match`` matches the model id applies,
the least specific first: a glob without wildcards (an exact id) is the most specific,
then globs with more literal characters; at equal specificity, later in the file wins. A
block replaces the detector list of each signal it names (an empty list or ``null``
switches the signal off) and leaves the other signals as the blocks before it set them.

**Validation** (:func:`load_plan`; the worker, ``genmon detectors list`` and ``genmon
replay`` all load it before doing anything): every problem is reported with the file,
line and field (``detectors.yaml:14: models[0].signals.error_rate[0].params.threshold: -1
is out of range; choose a value in (0, inf]``): YAML syntax, unknown fields, unknown
signals and detectors (with the close matches), a detector whose input does not fit the
signal, parameters its constructor refuses (each entry is instantiated), a share given to
a detector the budget cannot calibrate or a calibrated parameter set by hand inside the
budget, and shares summing over 1 for a model.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from genmon.detectors import REGISTRY
from genmon.detectors.calibration import catalog
from genmon.detectors.calibration.catalog import FITS, SIGNALS, UNFED, Input
from genmon.detectors.exceptions import DetectorError
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import Severity
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: genmon's shipped plan (the defaults of ``detectors.config_file``).
DEFAULTS_NAME = "defaults.yaml"
SECONDS_PER_WEEK = 7 * 24 * 3600.0
#: Dimension of the bundled encoder's embeddings, for validating ``dims: 0`` entries.
ENCODER_DIMS = 384
_MAX_CACHED_MODELS = 10_000


def defaults_path() -> Path:
    """Where genmon's shipped plan is installed."""
    return Path(str(files("genmon.detectors.calibration") / DEFAULTS_NAME))


@dataclass(frozen=True)
class PlanEntry:
    """One detector on one signal of a model."""

    signal: str
    detector: str
    params: dict[str, Any]
    severity: Severity | None  # None: from effect size and confidence
    share: float  # of detectors.false_pages_per_week; 0 = outside the budget
    source: str  # "path/to/detectors.yaml:12"
    reference_size: int | None = None  # observations a reference detector learns first
    dims: int | None = None  # embedding dimensions it sees (None: catalog.EMBEDDING_DIMS)
    name: str = ""  # the series' detector key: the detector, "#2" for a second one

    @property
    def builtin(self) -> bool:
        """Judged by the runner's own path (rate CUSUM on baselines, embedding shift)."""
        return catalog.is_builtin(self.signal, self.detector)

    @property
    def calibrated(self) -> bool:
        return self.share > 0

    @property
    def input(self) -> Input:
        form = catalog.fitting_input(self.detector, self.signal)
        assert form is not None  # load_plan refused the entry otherwise
        return form


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    severity: Literal["auto", "warning", "error", "critical"] = "auto"
    share: float = Field(0.0, ge=0.0, le=1.0)
    reference_size: int | None = Field(None, ge=2, le=100_000)
    dims: int | None = Field(None, ge=0, le=4096)


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str = Field(min_length=1)
    signals: dict[str, list[_Entry]] = Field(default_factory=dict)

    @field_validator("signals", mode="before")
    @classmethod
    def _null_is_off(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [] if v is None else v for k, v in value.items()}
        return value


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    models: list[_Block] = Field(min_length=1)


Loc = tuple[str | int, ...]


class PlanErrors:
    """Problems of one file, each at its line: ``path:line: field: problem``."""

    def __init__(self, display: str, root: yaml.Node | None) -> None:
        self.display, self.root = display, root
        self.lines: list[str] = []

    def add(self, loc: Loc, problem: str) -> None:
        self.lines.append(f"{self.display}:{self.line(loc)}: {field_name(loc)}: {problem}")

    def line(self, loc: Loc) -> int:
        """The line of ``loc`` in the file (its key's line), or of its nearest parent."""
        node, line = self.root, 1
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if hit is None:
                    break
                line, node = hit[0].start_mark.line + 1, hit[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    break
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def raise_if_any(self) -> None:
        if self.lines:
            hint = (
                f"fix the detector plan {self.display} (detectors.config_file);"
                " `genmon detectors list --file PATH` checks a file"
            )
            raise ConfigurationError("\n".join([*self.lines, hint]))


def field_name(loc: Loc) -> str:
    """``models[0].signals.error_rate[0].params.threshold``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def load_plan(settings: Settings, path: Path | None = None) -> DetectorPlan:
    """Read and validate the plan of ``detectors.config_file`` (or ``path``; default:
    genmon's shipped one). ``ConfigurationError`` lists every problem with its file, line
    and field, so nothing runs half-configured."""
    chosen = path or settings.detectors.config_file
    source = Path(chosen) if chosen is not None else defaults_path()
    display = str(chosen) if chosen is not None else f"genmon:{DEFAULTS_NAME}"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the detector plan {display}: {exc}; fix GENMON_DETECTORS__CONFIG_FILE"
        ) from exc
    return parse_plan(text, display, settings)


def parse_plan(text: str, display: str, settings: Settings) -> DetectorPlan:
    """Validate a plan's YAML ``text``; ``display`` names it in errors and sources."""
    root, data = _read_yaml(text, display)
    errors = PlanErrors(display, root)
    try:
        spec = _File.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            errors.add(tuple(error["loc"]), _pydantic_problem(error))
        errors.raise_if_any()
        raise AssertionError("unreachable") from exc
    blocks = [
        _block_entries(block, i, errors, display, settings) for i, block in enumerate(spec.models)
    ]
    errors.raise_if_any()
    plan = DetectorPlan(display, blocks)
    plan.check_shares(errors)
    errors.raise_if_any()
    return plan


def compose_yaml(text: str, display: str, errors: PlanErrors) -> tuple[yaml.Node | None, Any]:
    """``(node tree, data)`` of a YAML file; a syntax error is raised through ``errors`` as
    ``file:line: YAML syntax: ...`` (the node tree gives every later problem its line)."""
    root = data = None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        errors.lines.append(f"{display}:{line}: YAML syntax: {exc.problem or exc}")
    except yaml.YAMLError as exc:
        errors.lines.append(f"{display}:1: YAML syntax: {exc}")
    errors.raise_if_any()
    return root, data


def _read_yaml(text: str, display: str) -> tuple[yaml.Node | None, Any]:
    errors = PlanErrors(display, None)
    root, data = compose_yaml(text, display, errors)
    if data is None:
        errors.lines.append(f"{display}:1: (file): the plan is empty; it needs `models:`")
    duplicate = _duplicate_key(root)
    if duplicate is not None:
        errors.lines.append(
            f"{display}:{duplicate.start_mark.line + 1}: {duplicate.value}: the key is given"
            " twice in one mapping; keep one"
        )
    errors.raise_if_any()
    return root, data


def _duplicate_key(node: yaml.Node | None) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                return key
            seen.add(key.value)
            found = _duplicate_key(value)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found is not None:
                return found
    return None


def _pydantic_problem(error: Any) -> str:
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown field; remove it (fields: detector, params, severity, share, ...)"
    if error["type"] == "missing":
        return "required; add it"
    given = error.get("input")
    shown = "" if isinstance(given, dict | list) else f"{given!r}: "
    return f"{shown}{message[0].lower()}{message[1:]}"


# -- one block of the file ------------------------------------------------------------------
Block = tuple[str, int, dict[str, tuple[PlanEntry, ...]]]


def _block_entries(
    block: _Block, index: int, errors: PlanErrors, display: str, settings: Settings
) -> Block:
    """``(match, line, signal -> entries)`` of one block, its problems added to ``errors``."""
    signals: dict[str, tuple[PlanEntry, ...]] = {}
    for signal, items in block.signals.items():
        where: Loc = ("models", index, "signals", signal)
        if signal not in SIGNALS:
            close = difflib.get_close_matches(signal, SIGNALS, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            errors.add(where, f"unknown signal {signal!r}; {hint}signals: {', '.join(SIGNALS)}")
            continue
        entries: list[PlanEntry] = []
        for n, item in enumerate(items):
            entry = _entry(signal, item, (*where, n), errors, display, settings)
            if entry is not None:
                same = sum(e.detector == entry.detector for e in entries)
                entries.append(replace(entry, name=_series_name(entry.detector, same)))
        signals[signal] = tuple(entries)
    return block.match, errors.line(("models", index, "match")), signals


def _series_name(detector: str, earlier: int) -> str:
    return detector if earlier == 0 else f"{detector}#{earlier + 1}"


def _entry(
    signal: str, item: _Entry, loc: Loc, errors: PlanErrors, display: str, settings: Settings
) -> PlanEntry | None:
    before = len(errors.lines)
    detector = item.detector
    if detector not in REGISTRY or detector not in FITS:
        names = sorted(set(REGISTRY) & set(FITS))
        close = difflib.get_close_matches(detector, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        errors.add(
            (*loc, "detector"),
            f"unknown detector {detector!r}; {hint}detectors: {', '.join(names)}",
        )
        return None
    form = catalog.fitting_input(detector, signal)
    if form is None:
        errors.add((*loc, "detector"), _misfit(detector, signal))
        return None
    entry = PlanEntry(
        signal=signal,
        detector=detector,
        params=dict(item.params),
        severity=None if item.severity == "auto" else Severity(item.severity),
        share=item.share,
        source=f"{display}:{errors.line(loc)}",
        reference_size=item.reference_size,
        dims=item.dims,
    )
    _check_options(entry, form, loc, errors)
    if len(errors.lines) == before:
        _check_construction(entry, form, loc, errors, settings)
    return entry if len(errors.lines) == before else None


def _misfit(detector: str, signal: str) -> str:
    takes = ", ".join(FITS[detector].accepts)
    gives = ", ".join(SIGNALS[signal].inputs)
    fits = catalog.signals_for(detector)
    if not fits:
        return f"{detector} takes {takes}, which no signal gives yet: {UNFED.get(detector, '')}"
    return f"{detector} takes {takes}; signal {signal!r} gives {gives}; it fits: {', '.join(fits)}"


def _check_options(entry: PlanEntry, form: Input, loc: Loc, errors: PlanErrors) -> None:
    """The entry's own fields and parameter names, before the detector is built."""
    fit = FITS[entry.detector]
    accepted = _constructor_params(entry.detector)
    calibration = fit.calibration
    if entry.share > 0 and calibration is None:
        errors.add(
            (*loc, "share"),
            f"{entry.detector} cannot be calibrated to a share of the false-alarm budget (its"
            " threshold is a distance or a run length per text, not a false-alarm rate); set"
            " share: 0 and choose its threshold in params",
        )
    implied = fit.implied.get(form, {})
    for name in entry.params:
        where = (*loc, "params", name)
        if name == "reference" and fit.reference:
            errors.add(where, "the reference is learned from the stream; set reference_size")
        elif name not in accepted:
            errors.add(
                where,
                f"not a parameter of {entry.detector}; its parameters: "
                + ", ".join(p for p in accepted if p != "reference"),
            )
        elif name in implied:
            errors.add(where, f"set by the signal's input ({form}): {implied[name]!r}")
        elif entry.share > 0 and calibration is not None and name in calibration.params:
            errors.add(
                where,
                f"set by the budget from share {entry.share:g}; remove it, or set share: 0"
                " to choose it (the entry is then outside the budget)",
            )
    if entry.reference_size is not None:
        least = catalog.min_reference(entry.detector, entry.params)
        if not fit.reference:
            errors.add((*loc, "reference_size"), f"{entry.detector} learns no reference")
        elif entry.reference_size < least:
            errors.add(
                (*loc, "reference_size"),
                f"{entry.reference_size} is too small for {entry.detector}; at least {least}",
            )
    if entry.dims is not None and form is not Input.EMBEDDINGS:
        errors.add((*loc, "dims"), f"only for embedding signals, not {entry.signal!r}")


def _constructor_params(detector: str) -> list[str]:
    parameters = inspect.signature(REGISTRY[detector].__init__).parameters
    return [name for name in parameters if name != "self"]


def _check_construction(
    entry: PlanEntry, form: Input, loc: Loc, errors: PlanErrors, settings: Settings
) -> None:
    """Build the detector as the worker would (a stand-in reference where it learns one)."""
    parameters = inspect.signature(REGISTRY[entry.detector].__init__).parameters
    kwargs = construction_params(entry, arl_windows(entry, settings))
    if FITS[entry.detector].reference:
        kwargs["reference"] = stand_in_reference(entry, form)
    missing = [
        name
        for name, p in parameters.items()
        if name != "self" and p.default is inspect.Parameter.empty and name not in kwargs
    ]
    for name in missing:
        errors.add((*loc, "params", name), f"required by {entry.detector}; add it")
    if missing:
        return
    try:
        REGISTRY[entry.detector](**kwargs)
    except (DetectorError, ConfigurationError, TypeError, ValueError) as exc:
        param, problem = _split_parameter(str(exc), entry.params)
        errors.add((*loc, "params") if param is None else (*loc, "params", param), problem)


def _split_parameter(message: str, params: dict[str, Any]) -> tuple[str | None, str]:
    """``("threshold", "-1 is out of range ...")`` from ``"threshold=-1 is out of ..."``."""
    head, sep, rest = message.partition("=")
    if sep and head in params:
        return head, rest
    for name in params:
        if name in message:
            return name, message
    return None, message


def construction_params(entry: PlanEntry, arl: float, series: int = 1) -> dict[str, Any]:
    """The constructor arguments of an entry (without ``reference``): what its input
    implies, what the budget calibrates for ``series`` series each allowed ``arl`` windows
    between false alarms (share > 0 only), and the user's params."""
    fit = FITS[entry.detector]
    kwargs: dict[str, Any] = dict(fit.implied.get(entry.input, {}))
    kwargs.update(entry.params)
    if entry.calibrated and fit.calibration is not None:
        defaults = _defaults(entry.detector)
        kwargs.update(fit.calibration.values(arl * max(series, 1), {**defaults, **kwargs}))
    return kwargs


def _defaults(detector: str) -> dict[str, Any]:
    parameters = inspect.signature(REGISTRY[detector].__init__).parameters
    return {n: p.default for n, p in parameters.items() if p.default is not inspect.Parameter.empty}


def arl_windows(entry: PlanEntry, settings: Settings) -> float:
    """Windows between false alarms an entry's share allows (inf outside the budget)."""
    if entry.share <= 0:
        return float("inf")
    windows_per_week = SECONDS_PER_WEEK / settings.windows.tumbling_s
    return windows_per_week / (settings.detectors.false_pages_per_week * entry.share)


def stand_in_reference(entry: PlanEntry, form: Input) -> Any:
    """A reference of the right form and size, to validate the constructor's arguments."""
    size = entry.reference_size or catalog.reference_size(entry.detector, form, entry.params)
    rng = np.random.default_rng(0)
    if form is Input.CATEGORIES:
        return ["en", "fr"] * (size // 2 + 1)
    if form is Input.EMBEDDINGS:
        dims = entry.dims if entry.dims is not None else catalog.EMBEDDING_DIMS
        return rng.normal(size=(size, dims or ENCODER_DIMS)).astype(np.float32)
    return rng.normal(size=size)


# -- the resolved plan ----------------------------------------------------------------------
class DetectorPlan:
    """The validated plan: each model id's entries (see the module docstring for the rule)."""

    def __init__(self, display: str, blocks: list[Block]) -> None:
        self.display = display
        self.blocks = blocks
        self._order = sorted(range(len(blocks)), key=lambda i: (_specificity(blocks[i][0]), i))
        self._cache: dict[str, tuple[PlanEntry, ...]] = {}
        self._warned: set[str] = set()

    def for_model(self, model_id: str) -> tuple[PlanEntry, ...]:
        """Every entry that runs for ``model_id``, by signal in file order."""
        found = self._cache.get(model_id)
        if found is None:
            found = self._resolve(model_id)
            total = sum(entry.share for entry in found)
            if total > 1.0 + 1e-9:
                # Validation checked the globs' own ids; an id two unrelated globs match
                # may still add up past 1: scale down, never spend more than the budget.
                if model_id not in self._warned:
                    self._warned.add(model_id)
                    log.warning("model %s: plan shares sum to %.3g; scaled to 1", model_id, total)
                found = tuple(replace(e, share=e.share / total) for e in found)
            if len(self._cache) >= _MAX_CACHED_MODELS:
                self._cache.clear()
            self._cache[model_id] = found
        return found

    def entries(self, model_id: str, signal: str) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.for_model(model_id) if e.signal == signal)

    def entry(self, model_id: str, signal: str, detector: str) -> PlanEntry | None:
        """The first entry of ``detector`` on ``signal`` for the model, if any."""
        return next((e for e in self.entries(model_id, signal) if e.detector == detector), None)

    def _resolve(self, model_id: str) -> tuple[PlanEntry, ...]:
        chosen: dict[str, tuple[PlanEntry, ...]] = {}
        for i in self._order:
            pattern, _, signals = self.blocks[i]
            if fnmatch.fnmatchcase(model_id, pattern):
                chosen.update(signals)
        return tuple(entry for entries in chosen.values() for entry in entries)

    def check_shares(self, errors: PlanErrors) -> None:
        """Each block's glob, taken as a model id, may not get shares summing over 1."""
        for i, (pattern, _, _) in enumerate(self.blocks):
            example = example_id(pattern)
            if example is None:
                continue
            entries = self._resolve(example)
            total = sum(e.share for e in entries)
            if total > 1.0 + 1e-9:
                parts = ", ".join(f"{e.signal} {e.share:g}" for e in entries if e.share > 0)
                errors.add(
                    ("models", i, "match"),
                    f"a model like {example!r} gets shares summing to {total:.3g} ({parts});"
                    " they may sum to at most 1 (they split detectors.false_pages_per_week)",
                )


def _specificity(pattern: str) -> tuple[bool, int]:
    wild = sum(pattern.count(c) for c in "*?[")
    return wild == 0, len(pattern) - wild


def example_id(pattern: str) -> str | None:
    """A model id ``pattern`` matches, made of its literal characters."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            pass
        elif char == "?":
            out += "x"
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out += char
            else:
                inner = pattern[i + 1 : end].lstrip("!")
                out += inner[:1] or "x"
                i = end
        else:
            out += char
        i += 1
    return out if fnmatch.fnmatchcase(out, pattern) else None
