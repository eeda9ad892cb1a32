"""The retrain policy: what may start a fine-tune, what holds one back, how it trains and
how the gate judges it (``retrain.policy_file``; genmon's own is ``default_policy.yaml``).

The file (YAML)::

    version: 1
    triggers:
      incidents:                       # an incident starts a job when a matcher fits it
        - name: answer-quality         # named in "why" reasons
          match:                       # every field given must fit; lists are any-of
            kind: [quality, anomaly]   # drift | bias | anomaly | quality
            detector: [rate_cusum]     # names (the "#2" of a second entry ignored) or globs
            signal: [refusal_rate]     # signals of the detector catalog, or globs
            severity: warning          # the least severity: info < warning < error < critical
            model: ["support-*"]       # globs on the model id
            segment: ["*locale=de*"]   # globs on the incident's segment ("" when it has none)
          after_firings: 1             # findings the incident must have had first
      volume: {new_examples: 1000}     # labelled examples since the model's latest job
      manual: true                     # `genmon retrain request MODEL --reason ...`
    guards:
      cooldown_s: 3600                 # since the latest job was created (automatic triggers)
      min_examples_per_class: 20       # usable examples per class since the last promoted job
      max_running: 1                   # jobs running at once, all models (the worker's claim)
      daily_device_hours: 4            # device-hours per UTC day, all models (the worker's claim)
      require_approval: false          # jobs wait in pending_approval for `genmon retrain approve`
      max_attempts: 3                  # claims of a job before it ends failed
    training: {trainer: lora, params: {max_steps: 60}}
    gate: {thresholds: [...], min_eval_examples: 20}   # genmon.retrain.gate.GateConfig
    rollout:                           # how a version that passed the gate reaches traffic
      mode: canary                     # canary: challenger on a share, watched | direct: champion
      share: 0.10                      # the challenger's share of traffic (0 < share < 1)
      alpha: 0.05                      # false rollbacks allowed per rollout (the whole family)
      power: 0.8                       # chance to catch a regression of min_regression
      min_regression: {negative_feedback: 0.05}   # per watch signal; absolute rate increases
      min_segment_share: 0.25          # segments this big must be watched to their plan too
      max_watch_s: 86400               # the longest watch; then the rollout is inconclusive
      on_regression: rollback          # rollback: by itself | page: a person decides
    models:                            # per-model overrides, by glob on the model id
      - match: "support-*"
        guards: {require_approval: true}

**Classes** (``min_examples_per_class``): what the training strategy can use, since the
model's last promoted job. ``sft``/``dpo``: corrections that differ from the logged response,
by label (``unlabelled`` when none), every label present reaching the minimum. ``kto``:
desirable (thumbs up, good scores, each correction) and undesirable (thumbs down, bad scores,
each replaced response) both reaching it. ``auto``: either. Opted-out subjects never count.

**Overrides.** Every ``models`` block whose ``match`` fits the model id applies, the least
specific first (as in the detector plan: an exact id is the most specific, then globs with
more literal characters; at equal specificity later in the file wins). A block replaces the
fields it gives (``triggers.incidents`` as a whole list); ``training.params`` and
``rollout.min_regression`` are merged (a signal not named keeps the default).
``max_running`` and ``daily_device_hours`` limit the whole queue, so only the top level sets
them.

**Validation** (:func:`load_policy`): every problem at once, each as ``file:line: field:
problem`` in one :class:`~genmon.retrain.exceptions.PolicyError`: YAML syntax, duplicate and
unknown keys (with close matches), values out of range, unknown signals and detectors, gate
thresholds :class:`~genmon.retrain.gate.GateConfig` refuses.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import types
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from genmon.detectors import REGISTRY
from genmon.detectors.calibration.catalog import SIGNALS
from genmon.detectors.calibration.plan import Loc, PlanErrors, compose_yaml
from genmon.detectors.rollout import DEFAULT_MIN_REGRESSION, WATCH_SIGNALS
from genmon.exceptions import ConfigurationError
from genmon.retrain.exceptions import PolicyError
from genmon.retrain.gate import BEHAVIOUR_SIGNALS, SCORED_METRICS, GateConfig
from genmon.schemas.events import FindingKind, Severity
from genmon.schemas.incidents import Incident

DEFAULT_NAME = "default_policy.yaml"
SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2, Severity.CRITICAL: 3}
#: Findings that name no detector of the registry or no signal of the catalog.
OTHER_DETECTORS = frozenset({"slo", "notify"})
OTHER_SIGNAL_PREFIXES = ("slo_", "destination_unreachable")
#: Guards of the whole queue (the worker's claim), not of one model.
QUEUE_GUARDS = ("max_running", "daily_device_hours")


def default_policy_path() -> Path:
    """Where genmon's shipped policy is installed."""
    return Path(str(files("genmon.retrain") / DEFAULT_NAME))


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(_one_or_many)]
Kinds = Annotated[list[FindingKind], BeforeValidator(_one_or_many)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IncidentMatch(_Strict):
    kind: Kinds | None = None
    detector: Names | None = None
    signal: Names | None = None
    severity: Severity | None = None
    model: Names | None = None
    segment: Names | None = None

    def mismatches(self, incident: Incident) -> list[str]:
        """What of ``incident`` this matcher does not accept (empty: it matches)."""
        out: list[str] = []
        if self.kind is not None and incident.kind not in self.kind:
            out.append(f"kind {incident.kind.value} is not {_any(k.value for k in self.kind)}")
        detector = incident.detector.split("#", 1)[0]
        if self.detector is not None and not _fits(detector, self.detector):
            out.append(f"detector {detector} is not {_any(self.detector)}")
        if self.signal is not None and not _fits(incident.signal, self.signal):
            out.append(f"signal {incident.signal} is not {_any(self.signal)}")
        if self.severity is not None and (
            SEVERITY_RANK[incident.severity] < SEVERITY_RANK[self.severity]
        ):
            out.append(f"severity {incident.severity.value} is below {self.severity.value}")
        if self.model is not None and not _fits(incident.model_id, self.model):
            out.append(f"model {incident.model_id} does not fit {_any(self.model)}")
        if self.segment is not None and not _fits(incident.segment or "", self.segment):
            out.append(
                f"segment {incident.segment or '(none)'!r} does not fit {_any(self.segment)}"
            )
        return out


def _fits(value: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def _any(values: Any) -> str:
    shown = list(values)
    return shown[0] if len(shown) == 1 else "any of " + ", ".join(shown)


class IncidentTrigger(_Strict):
    name: str | None = None
    match: IncidentMatch
    after_firings: int = Field(1, ge=1)


class VolumeTrigger(_Strict):
    new_examples: int = Field(ge=1)


class ScheduleTrigger(_Strict):
    """Retrain by the clock (``cron``, in ``scheduler.timezone``), run by the scheduler."""

    cron: str = Field(min_length=1)
    name: str | None = None


class Triggers(_Strict):
    incidents: list[IncidentTrigger] = Field(default_factory=list)
    volume: VolumeTrigger | None = None
    schedule: list[ScheduleTrigger] = Field(default_factory=list)
    manual: bool = True


class Guards(_Strict):
    cooldown_s: float = Field(3600.0, ge=0)
    min_examples_per_class: int = Field(20, ge=0)
    max_running: int | None = Field(1, ge=1)
    daily_device_hours: float | None = Field(None, gt=0)
    require_approval: bool = False
    max_attempts: int = Field(3, ge=1)


class Training(_Strict):
    trainer: str = Field("lora", min_length=1)
    strategy: Literal["auto", "sft", "kto", "dpo"] = "auto"
    """``sft`` trains on corrections, ``kto`` on thumbs and scores (unpaired), ``dpo`` on
    correction pairs; ``auto`` picks from the data the dataset holds."""
    params: dict[str, Any] = Field(default_factory=dict)


class Threshold(_Strict):
    metric: Literal[SCORED_METRICS + BEHAVIOUR_SIGNALS]  # type: ignore[valid-type]
    greater_is_better: bool
    min_absolute_change: float = Field(0.0, ge=0)
    min_relative_change: float = Field(0.0, ge=0)
    threshold: float | None = None
    must_improve: bool = True


def _default_thresholds() -> list[Threshold]:
    return [
        Threshold(metric="completion_loss", greater_is_better=False),
        Threshold(metric="preference_accuracy", greater_is_better=True, must_improve=False),
    ]


class Gate(_Strict):
    thresholds: list[Threshold] = Field(default_factory=_default_thresholds)
    min_eval_examples: int = Field(20, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    behaviour_min_prompts: int = Field(10, ge=1)
    servable_budget_s: float = Field(30.0, gt=0)
    per_segment: bool = True
    """Judge every metric also per segment (the TFX per-slice rule)."""
    min_segment_examples: int = Field(20, ge=1)
    """Segments with fewer evaluation examples are not judged on their own."""
    segment_tolerance: float = Field(0.02, ge=0)
    """How much worse a segment (or the golden set) may get, with confidence, before the gate
    rejects: in the metric's units (nats for the losses, a share for preference_accuracy).
    Not 0: any fine-tune moves a loss by a few thousandths of a nat everywhere."""
    golden_set: str | None = None
    """A JSONL file (or artifact URI) of ``{prompt, completion}`` the candidate must not get
    worse on (a guard against forgetting)."""


Rate = Annotated[float, Field(gt=0, lt=1)]


class RolloutPolicy(_Strict):
    """How a version that passed the gate reaches traffic (:mod:`genmon.retrain.rollout`).

    ``canary``: it becomes the challenger on ``share`` of traffic, watched against the
    champion; ``direct``: it becomes the champion at once (the gate's word is enough).
    The watch is sized so that a regression of ``min_regression`` (per signal) is caught
    with probability ``power``, with at most ``alpha`` chance of rolling back an equal
    version. ``on_regression``: ``rollback`` by itself, or ``page`` (the incident opens, a
    person decides)."""

    mode: Literal["canary", "direct"] = "canary"
    share: float = Field(0.10, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    power: float = Field(0.80, gt=0, lt=1)
    min_regression: dict[Literal[WATCH_SIGNALS], Rate] = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(DEFAULT_MIN_REGRESSION)
    )
    min_segment_share: float = Field(0.25, gt=0, le=1)
    max_watch_s: float = Field(86_400.0, gt=0)
    on_regression: Literal["rollback", "page"] = "rollback"

    def over(self, block: RolloutPolicy | None) -> RolloutPolicy:
        """This section with ``block``'s fields on top; ``min_regression`` is merged."""
        if block is None:
            return self
        given = block.min_regression if "min_regression" in block.model_fields_set else {}
        merged = {**self.min_regression, **given}
        return _overlay(self, block).model_copy(update={"min_regression": merged})


class ModelOverride(_Strict):
    match: str = Field(min_length=1)
    triggers: Triggers | None = None
    guards: Guards | None = None
    training: Training | None = None
    gate: Gate | None = None
    rollout: RolloutPolicy | None = None


@dataclass(frozen=True)
class ModelPolicy:
    """The policy one model gets: the top level with its matching overrides applied."""

    model_id: str
    triggers: Triggers
    guards: Guards
    training: Training
    gate: Gate
    source: str  # "policy.yaml" plus the override blocks that applied, for reasons
    rollout: RolloutPolicy = dataclasses.field(default_factory=RolloutPolicy)

    def gate_config(self) -> GateConfig:
        """The gate section as :class:`~genmon.retrain.gate.GateConfig`."""
        return GateConfig.from_dict(self.gate.model_dump())

    def match_incident(self, incident: Incident) -> tuple[int | None, str]:
        """``(index, "")`` of the first incident trigger fitting ``incident``, else
        ``(None, why)`` naming the closest trigger and what it did not accept."""
        if not self.triggers.incidents:
            return None, f"the policy ({self.source}) has no incident triggers"
        misses = [t.match.mismatches(incident) for t in self.triggers.incidents]
        for index, miss in enumerate(misses):
            if not miss:
                return index, ""
        closest = min(range(len(misses)), key=lambda i: len(misses[i]))
        trigger = self.triggers.incidents[closest]
        name = f" {trigger.name!r}" if trigger.name else ""
        return None, (
            f"no incident trigger of the policy ({self.source}) matches; the closest,"
            f" triggers.incidents[{closest}]{name}: {'; '.join(misses[closest])}"
        )


class RetrainPolicy(_Strict):
    """A validated policy file; :meth:`for_model` resolves one model's policy."""

    version: Literal[1] = 1
    triggers: Triggers = Field(default_factory=Triggers)
    guards: Guards = Field(default_factory=Guards)
    training: Training = Field(default_factory=Training)
    gate: Gate = Field(default_factory=Gate)
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    models: list[ModelOverride] = Field(default_factory=list)
    _source: str = PrivateAttr(f"genmon:{DEFAULT_NAME}")

    @property
    def source(self) -> str:
        return self._source

    def for_model(self, model_id: str) -> ModelPolicy:
        """The top level, then each fitting override, least specific first."""
        triggers, guards, training, gate = self.triggers, self.guards, self.training, self.gate
        rollout = RolloutPolicy().over(self.rollout)  # signals the file leaves out: defaults
        applied: list[str] = []
        order = sorted(range(len(self.models)), key=lambda i: (_specificity(self.models[i]), i))
        for i in order:
            block = self.models[i]
            if not fnmatch.fnmatchcase(model_id, block.match):
                continue
            applied.append(f"models[{i}] {block.match!r}")
            triggers = _overlay(triggers, block.triggers)
            guards = _overlay(guards, block.guards)
            gate = _overlay(gate, block.gate)
            rollout = rollout.over(block.rollout)
            if block.training is not None:
                params = {**training.params, **block.training.params}
                training = _overlay(training, block.training).model_copy(update={"params": params})
        source = self.source + (f" with {', '.join(applied)}" if applied else "")
        return ModelPolicy(model_id, triggers, guards, training, gate, source, rollout)


M = TypeVar("M", bound=BaseModel)


def _overlay(base: M, block: M | None) -> M:
    if block is None:
        return base
    return base.model_copy(update={name: getattr(block, name) for name in block.model_fields_set})


def _specificity(block: ModelOverride) -> tuple[bool, int]:
    wild = sum(block.match.count(c) for c in "*?[")
    return wild == 0, len(block.match) - wild


# -- loading --------------------------------------------------------------------------------
class _Problems(PlanErrors):
    """:class:`PlanErrors` (``file:line: field: problem``) raising :class:`PolicyError`."""

    def raise_if_any(self) -> None:
        if self.lines:
            self.lines.sort(key=self._line_number)
            hint = f"fix the retrain policy {self.display} (retrain.policy_file)"
            raise PolicyError("\n".join([*self.lines, hint]))

    def _line_number(self, line: str) -> int:
        number = line[len(self.display) + 1 :].split(":", 1)[0]
        return int(number) if number.isdigit() else 0


def load_policy(path: Path | None = None) -> RetrainPolicy:
    """Read and validate the policy at ``path`` (``None``: genmon's shipped default).
    :class:`PolicyError` lists every problem with its file, line and field."""
    source = path if path is not None else default_policy_path()
    display = str(path) if path is not None else f"genmon:{DEFAULT_NAME}"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            f"cannot read the retrain policy {display}: {exc}; fix GENMON_RETRAIN__POLICY_FILE"
        ) from exc
    return parse_policy(text, display)


def parse_policy(text: str, display: str) -> RetrainPolicy:
    """Validate a policy's YAML ``text``; ``display`` names it in errors and reasons."""
    root, data = _read_yaml(text, display)
    problems = _Problems(display, root)
    _check_values(data, problems)
    try:
        policy = RetrainPolicy.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if part != "[key]")  # a mapping's key
            problems.add(loc, _problem(error, loc))
        problems.raise_if_any()
        raise AssertionError("unreachable") from exc
    _check_gates(policy, problems)
    _check_training(policy, problems)
    problems.raise_if_any()
    policy._source = display
    return policy


def _read_yaml(text: str, display: str) -> tuple[yaml.Node | None, Any]:
    problems = _Problems(display, None)
    root, data = compose_yaml(text, display, problems)
    if data is None:
        data = {}  # an empty file: every default
    elif not isinstance(data, dict):
        problems.lines.append(f"{display}:1: (file): the policy must be a mapping of sections")
    for key in _duplicates(root):
        problems.lines.append(
            f"{display}:{key.start_mark.line + 1}: {key.value}: given twice in one mapping;"
            " keep one"
        )
    problems.raise_if_any()
    return root, data


def _duplicates(node: yaml.Node | None) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        out: list[yaml.Node] = []
        for key, value in node.value:
            if key.value in seen:
                out.append(key)
            seen.add(key.value)
            out += _duplicates(value)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [key for item in node.value for key in _duplicates(item)]
    return []


def _problem(error: Any, loc: Loc) -> str:
    if error["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field; {hint}fields here: {', '.join(known)}"
    if error["type"] == "missing":
        return "required; add it"
    given = error.get("input")
    shown = "" if isinstance(given, dict | list) else f"{given!r}: "
    message = str(error["msg"])
    return f"{shown}{message[0].lower()}{message[1:]}"


def _fields_at(loc: Loc) -> list[str]:
    """The field names of the section at ``loc`` (for suggestions)."""
    current: Any = RetrainPolicy
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _section(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _section(annotation: Any) -> Any:
    """The model class inside ``X | None`` or ``list[X]``, else the annotation itself."""
    if get_origin(annotation) in (Union, types.UnionType, list):
        for arg in get_args(annotation):
            inner = _section(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _check_values(data: Any, problems: _Problems) -> None:
    """What the field types cannot say, read from the file's own data so that it is
    reported with the type errors: known signals and detectors, queue-wide guards."""
    sections: list[tuple[Loc, Any]] = [((), data)]
    blocks = data.get("models") if isinstance(data, dict) else None
    for i, block in enumerate(blocks if isinstance(blocks, list) else []):
        if not isinstance(block, dict):
            continue
        sections.append((("models", i), block))
        guards = block.get("guards")
        for name in QUEUE_GUARDS:
            if isinstance(guards, dict) and name in guards:
                problems.add(
                    ("models", i, "guards", name),
                    f"{name} limits the whole queue (every model); set it in the top-level guards",
                )
    for where, section in sections:
        triggers = section.get("triggers") if isinstance(section, dict) else None
        found = triggers.get("incidents") if isinstance(triggers, dict) else None
        for n, trigger in enumerate(found if isinstance(found, list) else []):
            match = trigger.get("match") if isinstance(trigger, dict) else None
            if isinstance(match, dict):
                _check_names((*where, "triggers", "incidents", n, "match"), match, problems)


def _check_gates(policy: RetrainPolicy, problems: _Problems) -> None:
    """Each gate section as :class:`~genmon.retrain.gate.GateConfig` takes it."""
    gates: list[tuple[Loc, Gate | None]] = [(("gate",), policy.gate)]
    gates += [(("models", i, "gate"), block.gate) for i, block in enumerate(policy.models)]
    for where, gate in gates:
        if gate is None:
            continue
        try:
            GateConfig.from_dict(gate.model_dump())
        except ConfigurationError as exc:
            problems.add(where, str(exc))


def _check_training(policy: RetrainPolicy, problems: _Problems) -> None:
    """The trainer can be loaded; the built-in ``lora`` one takes the params given."""
    from genmon.retrain.trainer import TrainingParams, load_trainer

    sections: list[tuple[Loc, Training | None]] = [((), policy.training)]
    sections += [(("models", i), b.training) for i, b in enumerate(policy.models) if b.training]
    known = [f.name for f in dataclasses.fields(TrainingParams)]
    for where, training in sections:
        assert training is not None
        trainer = training.trainer if "trainer" in training.model_fields_set else None
        try:
            load_trainer(trainer or policy.training.trainer)
        except ConfigurationError as exc:
            problems.add((*where, "training", "trainer"), str(exc))
            continue
        if (trainer or policy.training.trainer) != "lora":
            continue  # another trainer's params are its own to check
        for name in training.params:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.add(
                    (*where, "training", "params", name),
                    f"not a lora parameter; {hint}its parameters: {', '.join(known)}",
                )
        try:
            TrainingParams.from_dict(
                {
                    k: v
                    for k, v in {**policy.training.params, **training.params}.items()
                    if k in known
                }
            )
        except (ConfigurationError, TypeError) as exc:
            problems.add((*where, "training", "params"), str(exc))


def _check_names(loc: Loc, match: dict[str, Any], problems: _Problems) -> None:
    checks = (
        ("signal", sorted(SIGNALS), _known_signal),
        ("detector", sorted({*REGISTRY, *OTHER_DETECTORS}), _known_detector),
    )
    for field, names, known in checks:
        values = _one_or_many(match.get(field))
        for n, value in enumerate(values if isinstance(values, list) else []):
            if not isinstance(value, str) or any(c in value for c in "*?[") or known(value):
                continue
            close = difflib.get_close_matches(value, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            where = (*loc, field, n) if isinstance(match.get(field), list) else (*loc, field)
            problems.add(
                where, f"unknown {field} {value!r}; {hint}use a glob or one of {', '.join(names)}"
            )


def _known_signal(value: str) -> bool:
    return value in SIGNALS or value.startswith(OTHER_SIGNAL_PREFIXES)


def _known_detector(value: str) -> bool:
    return value in REGISTRY or value in OTHER_DETECTORS


__all__ = [
    "DEFAULT_NAME",
    "Gate",
    "Guards",
    "IncidentMatch",
    "IncidentTrigger",
    "ModelOverride",
    "ModelPolicy",
    "RetrainPolicy",
    "RolloutPolicy",
    "Threshold",
    "Training",
    "Triggers",
    "VolumeTrigger",
    "default_policy_path",
    "load_policy",
    "parse_policy",
]
