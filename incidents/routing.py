"""Label matchers (Alertmanager style), routes and destination configuration.

An incident's labels are ``model``, ``model_version``, ``detector``, ``kind``,
``severity``, ``segment``, ``signal`` and ``status``. A matcher is ``label OP value``
with OP one of ``=``, ``!=``, ``=~`` (regex, anchored at both ends), ``!~``; the value may
be double-quoted. Silences and routes match when *every* matcher matches.

>>> labels = {"model": "chat", "severity": "critical", "kind": "drift"}
>>> matches([parse_matcher('severity=~"error|critical"'), parse_matcher("model!=search")], labels)
True
>>> parse_matcher("colour=red")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
genmon.exceptions.ConfigurationError: matcher 'colour=red': unknown label 'colour'; ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from genmon.exceptions import ConfigurationError
from genmon.schemas.incidents import INCIDENTS_TOPIC_DESTINATION, Incident
from genmon.settings import DestinationSettings, NotifySettings, RouteSettings, RunbookSettings

LABELS = ("detector", "kind", "model", "model_version", "segment", "severity", "signal", "status")
_MATCHER = re.compile(r'^\s*([a-z_]+)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|(.*?))\s*$')


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            object.__setattr__(self, "regex", re.compile(self.value))

    def matches(self, labels: dict[str, str]) -> bool:
        actual = labels.get(self.label, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        found = self.regex.fullmatch(actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f'{self.label}{self.op}"{self.value}"'


def parse_matcher(text: str) -> Matcher:
    """``label OP value`` -> :class:`Matcher`; a clear error for anything else."""
    found = _MATCHER.match(text)
    if found is None:
        raise ConfigurationError(
            f"matcher {text!r} is not `label OP value` with OP one of =, !=, =~, !~ "
            '(for example severity=~"error|critical")'
        )
    label, op, quoted, bare = found.groups()
    if label not in LABELS:
        raise ConfigurationError(
            f"matcher {text!r}: unknown label {label!r}; use one of {', '.join(LABELS)}"
        )
    value = quoted.replace('\\"', '"') if quoted is not None else bare
    try:
        return Matcher(label, op, value)
    except re.error as exc:
        raise ConfigurationError(f"matcher {text!r}: bad regular expression ({exc})") from exc


def parse_matchers(texts: Iterable[str]) -> list[Matcher]:
    return [parse_matcher(text) for text in texts]


def matches(matchers: Sequence[Matcher], labels: dict[str, str]) -> bool:
    return all(matcher.matches(labels) for matcher in matchers)


def incident_labels(incident: Incident) -> dict[str, str]:
    """The labels silences and routes match an incident by."""
    return {
        "model": incident.model_id,
        "model_version": incident.model_version or "",
        "detector": incident.detector,
        "kind": str(incident.kind),
        "severity": str(incident.severity),
        "segment": incident.segment or "",
        "signal": incident.signal,
        "status": str(incident.status),
    }


def load_notify_settings(settings: NotifySettings) -> NotifySettings:
    """``settings`` with the destinations and routes of ``destinations_file`` added."""
    if settings.destinations_file is None:
        return settings
    path = Path(settings.destinations_file)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read notify.destinations_file {path} ({exc.strerror}); fix the path"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path} must hold a mapping with destinations: and routes:")
    try:
        destinations = [DestinationSettings.model_validate(d) for d in raw.get("destinations", [])]
        routes = [RouteSettings.model_validate(r) for r in raw.get("routes", [])]
    except ValidationError as exc:
        # pydantic shows input values; SecretStr fields keep secrets out of it.
        raise ConfigurationError(f"{path}: {exc}") from exc
    return settings.model_copy(
        update={
            "destinations": [*settings.destinations, *destinations],
            "routes": [*settings.routes, *routes],
        }
    )


@dataclass(frozen=True)
class RouteTarget:
    destination: str
    runbook: RunbookSettings | None


class Router:
    """Chooses the destinations of an incident's notifications.

    Routes are tried in order; the first whose matchers all match wins, unless it says
    ``continue: true``, in which case later routes are tried too. Without routes every
    destination gets every notification.
    """

    def __init__(self, settings: NotifySettings) -> None:
        settings = load_notify_settings(settings)
        self.destinations: dict[str, DestinationSettings] = {}
        for destination in settings.destinations:
            if destination.name == INCIDENTS_TOPIC_DESTINATION:
                raise ConfigurationError(
                    f"destination name {destination.name!r} is reserved for the incidents "
                    "topic; choose another name"
                )
            if destination.name in self.destinations:
                raise ConfigurationError(
                    f"destination name {destination.name!r} is used twice; names must be unique"
                )
            self.destinations[destination.name] = destination
        self.routes: list[tuple[RouteSettings, list[Matcher]]] = []
        for route in settings.routes:
            unknown = [name for name in route.destinations if name not in self.destinations]
            if unknown:
                raise ConfigurationError(
                    f"route to {unknown} names destinations that are not configured; "
                    f"configured: {sorted(self.destinations)}"
                )
            self.routes.append((route, parse_matchers(route.matchers)))

    def avoiding(self, destination: str) -> Router:
        """This router with ``destination`` left out of every answer; where the routes
        name no other destination, every other configured one (an alert about
        ``destination`` itself must reach someone, and never through it)."""
        return _Avoiding(self, destination)

    def route(self, labels: dict[str, Any]) -> list[RouteTarget]:
        if not self.routes:
            return [RouteTarget(name, None) for name in self.destinations]
        targets: dict[str, RouteTarget] = {}
        for route, matchers in self.routes:
            if not matches(matchers, labels):
                continue
            for name in route.destinations:
                targets.setdefault(name, RouteTarget(name, route.runbook))
            if not route.continue_:
                break
        return list(targets.values())


class _Avoiding(Router):
    """A :class:`Router` that never answers one destination (see :meth:`Router.avoiding`)."""

    def __init__(self, base: Router, avoided: str) -> None:  # no super(): nothing to load
        self.destinations = base.destinations
        self.routes = base.routes
        self.avoided = avoided

    def route(self, labels: dict[str, Any]) -> list[RouteTarget]:
        targets = [t for t in super().route(labels) if t.destination != self.avoided]
        if targets:
            return targets
        return [RouteTarget(name, None) for name in self.destinations if name != self.avoided]
