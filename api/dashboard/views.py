"""What the pages show, computed from the database: plain values the templates lay out.

The shared reads (a page of incidents, a timeline, a signal series) come from
:mod:`genmon.api.queries`, so the dashboard and the JSON API show the same thing; what is
only a page's (the overview's recent windows of every model, the segments of an
incident's span, a model's versions and jobs) is here.

Rates are compared with Wilson score intervals (95 %): they stay inside [0, 1] and keep a
sensible width for the small counts of one segment in a few windows, where the normal
approximation says "0 % +- 0" after zero errors in three requests.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from genmon.api import queries
from genmon.api.queries import aware
from genmon.schemas.events import IncidentStatus
from genmon.schemas.incidents import Incident
from genmon.schemas.retrain import ModelAliasRow, RegisteredModel, Rollout
from genmon.schemas.signals import ALL, ROLLUP_RESOLUTION_S, WindowSignal
from genmon.schemas.tables import ModelVersion, RetrainJob

#: How far back the overview sums traffic.
OVERVIEW_S = 3600
#: How far back a model page charts.
MODEL_CHART_S = 6 * 3600
#: Windows charted before an incident's first finding, for context.
CONTEXT_S = 3600
#: z of a two-sided 95 % interval.
Z95 = 1.959964
#: Incidents that are not over.
UNRESOLVED = [IncidentStatus.OPEN.value, IncidentStatus.ACKNOWLEDGED.value]


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None, float | None]:
    """Rate ``k / n`` and its Wilson score interval; ``None`` three times when ``n`` is 0.

    >>> [round(x, 3) for x in wilson(0, 3)]
    [0.0, 0.0, 0.561]
    """
    if n <= 0:
        return None, None, None
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return p, max(0.0, centre - half), min(1.0, centre + half)


# --- models overview ---------------------------------------------------------------------


@dataclass
class VersionHealth:
    """One model version's recent windows, summed."""

    model_id: str
    version: str
    windows: int = 0
    requests: int = 0
    errors: int = 0
    feedback: int = 0
    negative: int = 0
    latency_p95_ms: float | None = None
    last_window: datetime | None = None
    firing: list[str] = field(default_factory=list)
    open_incidents: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def negative_rate(self) -> float | None:
        return self.negative / self.feedback if self.feedback else None


@dataclass
class ModelHealth:
    model_id: str
    versions: list[VersionHealth]
    open_incidents: int
    serving_version: str | None = None


def overview(session: Session, now: datetime) -> list[ModelHealth]:
    """Every model seen lately, registered, or with an open incident: its versions' traffic,
    errors, latency, feedback and which signals fire in their latest window."""
    since = now - timedelta(seconds=OVERVIEW_S)
    rows = session.exec(
        select(WindowSignal)
        .where(
            WindowSignal.segment == ALL,
            WindowSignal.resolution_s != ROLLUP_RESOLUTION_S,
            col(WindowSignal.window_end) > since,
        )
        .order_by(col(WindowSignal.window_start))
    )
    versions: dict[tuple[str, str], VersionHealth] = {}
    for row in rows:
        health = versions.setdefault(
            (row.model_id, row.model_version), VersionHealth(row.model_id, row.model_version)
        )
        health.windows += 1
        health.requests += row.requests
        health.errors += row.errors
        health.feedback += row.feedback
        health.negative += row.negative_feedback
        health.latency_p95_ms = row.latency_p95_ms  # rows come oldest first: the latest wins
        health.last_window = row.window_end
        health.firing = sorted(s for s, v in row.scores.items() if _detected(v))
    open_by_version: dict[tuple[str, str], int] = defaultdict(int)
    for incident in session.exec(
        select(Incident).where(col(Incident.status).in_(UNRESOLVED)).limit(queries.MAX_PAGE)
    ):
        open_by_version[(incident.model_id, incident.model_version or ALL)] += 1
    for key, count in open_by_version.items():
        if key in versions:
            versions[key].open_incidents = count
    by_model = queries.open_incidents_by_model(session)
    registered = {m.model_id: m for m in session.exec(select(RegisteredModel))}
    models = sorted({k[0] for k in versions} | set(by_model) | set(registered))
    result = []
    for model_id in models:
        mine = sorted(
            (v for k, v in versions.items() if k[0] == model_id),
            key=lambda v: (v.version != ALL, v.version),
        )
        serving = registered[model_id].serving_version if model_id in registered else None
        result.append(ModelHealth(model_id, mine, by_model.get(model_id, 0), serving))
    return result


def _detected(score: Any) -> bool:
    return isinstance(score, dict) and bool(score.get("detected"))


# --- incident detail ---------------------------------------------------------------------


@dataclass(frozen=True)
class ScorePoint:
    at: str
    score: float | None
    threshold: float | None
    detected: bool


@dataclass(frozen=True)
class Comparison:
    """A segment's rate against the rest of the model, each with its 95 % interval."""

    segment: str
    k: int
    n: int
    rate: float | None
    low: float | None
    high: float | None
    rest_k: int
    rest_n: int
    rest_rate: float | None
    rest_low: float | None
    rest_high: float | None
    highlighted: bool = False

    @property
    def apart(self) -> bool:
        """The two intervals do not overlap."""
        if None in (self.low, self.high, self.rest_low, self.rest_high):
            return False
        return bool(self.low > self.rest_high or self.high < self.rest_low)  # type: ignore[operator]


def incident_span(incident: Incident, now: datetime) -> tuple[datetime, datetime]:
    """The windows an incident covers: from its first finding's window to its last one
    (or now, while it is open)."""
    start = aware(incident.first_seen_at)
    window_start = (incident.evidence or {}).get("window_start")
    if isinstance(window_start, str):
        with contextlib.suppress(ValueError):  # a snapshot cut short: the incident's own
            start = min(start, aware(datetime.fromisoformat(window_start)))
    end = aware(incident.resolved_at or incident.last_seen_at or now)
    return start, max(end, start + timedelta(seconds=1))


def score_points(
    session: Session, incident: Incident, now: datetime
) -> tuple[list[ScorePoint], str]:
    """The incident's signal over time against its threshold, and where it comes from:
    the stored window signals of its model, version and segment when they hold the
    signal, else the incident's own recent chart points."""
    start, end = incident_span(incident, now)
    segment = incident.segment or ALL
    for version in dict.fromkeys([incident.model_version or ALL, ALL]):
        rows = queries.signal_rows(
            session,
            incident.model_id,
            version=version,
            segment=segment,
            since=start - timedelta(seconds=CONTEXT_S),
            until=end + timedelta(seconds=CONTEXT_S),
            limit=2000,
        )
        points = [
            ScorePoint(
                at=aware(row.window_end).isoformat(),
                score=_float(judged.get("score")),
                threshold=_float(judged.get("threshold")),
                detected=bool(judged.get("detected")),
            )
            for row in rows
            if (judged := judgement(row, incident.signal, incident.detector)) is not None
        ]
        if points:
            return points, f"window signals ({version}, segment {segment})"
    return [
        ScorePoint(
            at=str(point.get("at")),
            score=_float(point.get("score")),
            threshold=incident.threshold,
            detected=bool(point.get("detected")),
        )
        for point in incident.chart
    ], "the incident's recent findings"


def judgement(row: WindowSignal, signal: str, detector: str) -> dict[str, Any] | None:
    """The row's score of ``signal`` by ``detector``: a second detector of one signal is
    stored as ``"<signal>:<detector>"`` (:mod:`genmon.streams.signals`)."""
    for key in (f"{signal}:{detector}", signal):
        judged = row.scores.get(key)
        if isinstance(judged, dict) and judged.get("detector") in (None, detector):
            return judged
    judged = row.scores.get(signal)
    return judged if isinstance(judged, dict) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


#: Which counts a signal's rate is made of: (events, of how many), from a window row.
def _counts(signal: str, row: WindowSignal) -> tuple[int, int]:
    if "feedback" in signal or signal == "negative_rate":
        return row.negative_feedback, row.feedback
    if signal.startswith(("refusal", "empty")):
        rate = row.refusal_rate if signal.startswith("refusal") else row.empty_rate
        return round((rate or 0.0) * row.requests), row.requests
    return row.errors, row.requests


def rate_name(signal: str) -> str:
    """What :func:`segment_comparison` compares for ``signal``."""
    if "feedback" in signal or signal == "negative_rate":
        return "negative feedback rate"
    if signal.startswith("refusal"):
        return "refusal rate"
    if signal.startswith("empty"):
        return "empty-answer rate"
    return "error rate"


def segment_comparison(session: Session, incident: Incident, now: datetime) -> list[Comparison]:
    """Each segment of the incident's model over the incident's span against the rest of
    the model (its whole-model series minus the segment), the incident's segment first."""
    start, end = incident_span(incident, now)
    rows = list(
        session.exec(
            select(WindowSignal).where(
                WindowSignal.model_id == incident.model_id,
                col(WindowSignal.model_version).in_([incident.model_version or ALL, ALL]),
                WindowSignal.resolution_s != ROLLUP_RESOLUTION_S,
                col(WindowSignal.window_end) > start,
                col(WindowSignal.window_start) < end,
            )
        )
    )
    # The incident's version when it has segment rows; the whole model otherwise.
    versions = [v for v in dict.fromkeys([incident.model_version or ALL, ALL])]
    version = next(
        (v for v in versions if any(r.model_version == v and r.segment != ALL for r in rows)),
        None,
    )
    if version is None:
        return []
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        if row.model_version == version:
            k, n = _counts(incident.signal, row)
            totals[row.segment][0] += k
            totals[row.segment][1] += n
    star_k, star_n = totals.pop(ALL, [0, 0])
    result = []
    for segment, (k, n) in totals.items():
        rest_k, rest_n = max(0, star_k - k), max(0, star_n - n)
        result.append(
            Comparison(
                segment,
                k,
                n,
                *wilson(k, n),
                rest_k,
                rest_n,
                *wilson(rest_k, rest_n),
                highlighted=segment == incident.segment,
            )
        )
    result.sort(key=lambda c: (not c.highlighted, -(c.rate or 0.0), c.segment))
    return result[:20]


def evidence_segments(incident: Incident) -> list[dict[str, Any]]:
    """The segments the detector itself compared (``evidence.details.segments``), as stored."""
    segments = _details(incident).get("segments")
    return [s for s in segments if isinstance(s, dict)] if isinstance(segments, list) else []


def clusters(incident: Incident) -> list[dict[str, Any]]:
    """The exemplar clusters of the evidence, largest first, as stored (already redacted
    as configured when the examples were taken)."""
    found = _details(incident).get("clusters")
    if not isinstance(found, list):
        return []
    shown = []
    for cluster in found:
        if not isinstance(cluster, dict):
            continue
        shown.append(
            {
                "size": cluster.get("size"),
                "representatives": [str(r) for r in cluster.get("representatives") or []],
                "request_ids": [str(r) for r in cluster.get("request_ids") or [] if r],
                "centroid_distance": _float(cluster.get("centroid_distance")),
            }
        )
    return shown


def evidence_values(incident: Incident) -> list[tuple[str, Any]]:
    """The detector's named numbers (``evidence.details.values``) and the window's size."""
    details = _details(incident)
    values: list[tuple[str, Any]] = []
    for pair in details.get("values") or []:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            values.append((str(pair[0]), pair[1]))
    for key in ("window_n", "baseline", "test"):
        if details.get(key) is not None:
            values.append((key, details[key]))
    return values


def evidence_notes(incident: Incident) -> list[str]:
    details = _details(incident)
    notes = [str(n) for n in details.get("notes") or []]
    if details.get("truncated"):
        notes.append(
            f"evidence cut to fit incidents.evidence_max_bytes "
            f"(it was {details.get('original_bytes')} bytes)"
        )
    analysis = details.get("error_analysis")
    if isinstance(analysis, dict) and analysis.get("examples"):
        notes.append(
            f"{analysis['examples']} affected examples of {analysis.get('signal')} clustered "
            f"with {analysis.get('vectors')}"
        )
    return notes


def _details(incident: Incident) -> dict[str, Any]:
    details = (incident.evidence or {}).get("details")
    return details if isinstance(details, dict) else {}


# --- model page --------------------------------------------------------------------------


@dataclass
class ModelPage:
    model_id: str
    registered: RegisteredModel | None
    aliases: list[ModelAliasRow]
    versions: list[ModelVersion]
    lineage: list[tuple[int, ModelVersion]]
    jobs: list[RetrainJob]
    rollouts: list[Rollout]
    rows: list[WindowSignal]
    incidents: list[Incident]

    @property
    def known(self) -> bool:
        return bool(self.registered or self.versions or self.rows or self.incidents)


def model_page(session: Session, model_id: str, now: datetime) -> ModelPage:
    """A model's registration, aliases, versions with their lineage, retrain jobs,
    rollouts, recent whole-model windows and unresolved incidents."""
    versions = list(
        session.exec(
            select(ModelVersion)
            .where(ModelVersion.model_id == model_id)
            .order_by(col(ModelVersion.created_at), col(ModelVersion.id))
        )
    )
    incidents, _ = queries.incident_page(session, status=UNRESOLVED, model_id=model_id, limit=50)
    return ModelPage(
        model_id=model_id,
        registered=session.get(RegisteredModel, model_id),
        aliases=list(
            session.exec(
                select(ModelAliasRow)
                .where(ModelAliasRow.model_id == model_id)
                .order_by(col(ModelAliasRow.alias))
            )
        ),
        versions=versions,
        lineage=lineage(versions),
        jobs=list(
            session.exec(
                select(RetrainJob)
                .where(RetrainJob.model_id == model_id)
                .order_by(col(RetrainJob.created_at).desc())
                .limit(20)
            )
        ),
        rollouts=list(
            session.exec(
                select(Rollout)
                .where(Rollout.model_id == model_id)
                .order_by(col(Rollout.started_at).desc())
                .limit(10)
            )
        ),
        rows=queries.signal_rows(
            session, model_id, since=now - timedelta(seconds=MODEL_CHART_S), limit=2000
        ),
        incidents=incidents,
    )


def lineage(versions: list[ModelVersion]) -> list[tuple[int, ModelVersion]]:
    """Versions as a tree by ``parent_version``, depth first: (depth, version) pairs; a
    version whose parent is not registered is a root."""
    names = {v.version for v in versions}
    children: dict[str | None, list[ModelVersion]] = defaultdict(list)
    for version in versions:
        parent = version.parent_version if version.parent_version in names else None
        children[parent].append(version)
    ordered: list[tuple[int, ModelVersion]] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        for child in children.get(parent, []):
            if child.version not in seen:
                seen.add(child.version)
                ordered.append((depth, child))
                walk(child.version, depth + 1)

    walk(None, 0)
    ordered += [(0, v) for v in versions if v.version not in seen]  # a cycle: list it flat
    return ordered


def live_marker(session: Session) -> str:
    """What changes whenever an incident does: the SSE stream pushes when it changes."""
    latest, count = session.exec(
        select(sa.func.max(Incident.updated_at), sa.func.count()).select_from(Incident)
    ).one()
    return f"{latest.isoformat() if latest else '-'}|{count}"
