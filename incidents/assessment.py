"""What a finding says about its incident: severity, title, reason, evidence, chart, runbook.

Pure functions of a finding and :class:`~genmon.settings.IncidentSettings`, no database:
the manager (:mod:`~genmon.incidents.manager`) decides *what happens* to an incident,
these decide *what it says*, so they can be read and tested on their own.

A finding may carry its own ``severity`` and ``title`` (the detector runner judges them
from effect size and confidence, and says what happened with numbers); without them
:func:`severity_for` bands its score and effect size and :func:`title_for` names model,
detector, signal and segment. Severities compare by :data:`SEVERITY_RANK`: a later finding
of an open incident with a higher one escalates it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from genmon.schemas.events import Finding, Severity
from genmon.schemas.incidents import Incident
from genmon.settings import IncidentSettings, RunbookSettings

SEVERITY_ORDER = (Severity.INFO, Severity.WARNING, Severity.ERROR, Severity.CRITICAL)
SEVERITY_RANK = {severity: rank for rank, severity in enumerate(SEVERITY_ORDER)}
"""Rank of each severity, for comparisons: ``Severity`` values are strings."""


def severity_for(finding: Finding, settings: IncidentSettings) -> Severity:
    """The worse of the severities from score/threshold and from |effect size| bands.

    A detected finding is at least a warning, whatever its bands say.
    """

    def band(value: float, bands: dict[str, float]) -> Severity:
        best = Severity.INFO
        for name, least in bands.items():
            severity = Severity(name)
            if value >= least and SEVERITY_RANK[severity] > SEVERITY_RANK[best]:
                best = severity
        return best

    ratio = finding.score / finding.threshold if finding.threshold > 0 else 0.0
    severity = band(ratio, settings.severity_score_ratio_bands)
    if finding.effect_size is not None:
        by_effect = band(abs(finding.effect_size), settings.severity_effect_size_bands)
        severity = max(severity, by_effect, key=SEVERITY_RANK.__getitem__)
    if finding.detected and severity is Severity.INFO:
        return Severity.WARNING
    return severity


def title_for(finding: Finding) -> str:
    """A title for a finding that brings none: model, detector, signal and segment."""
    segment = f" [{finding.segment}]" if finding.segment else ""
    title = f"{finding.kind.value} on {finding.model_id}: {finding.detector} flagged "
    return f"{title}{finding.signal}{segment}"[:512]


def finding_severity(finding: Finding, settings: IncidentSettings) -> Severity:
    """The finding's own severity, else the one its score and effect size band to."""
    return finding.severity or severity_for(finding, settings)


def finding_title(finding: Finding) -> str:
    """The finding's own title (it says what happened, with numbers), else a generic one."""
    return finding.title or title_for(finding)


def runbook_for(finding: Finding, settings: IncidentSettings) -> RunbookSettings | None:
    """The runbook configured for the finding's detector, else for its kind."""
    runbooks = settings.runbooks
    return runbooks.get(finding.detector) or runbooks.get(finding.kind.value)


def describe_score(finding: Finding) -> str:
    """Score, threshold, effect size and p-value in one line: the reason of a transition."""
    return (
        f"{finding.detector} score {finding.score:.4g} vs threshold {finding.threshold:.4g}"
        + (f", effect size {finding.effect_size:.3g}" if finding.effect_size is not None else "")
        + (f", p={finding.p_value:.3g}" if finding.p_value is not None else "")
    )


def observe(
    incident: Incident, finding: Finding, now: datetime, settings: IncidentSettings
) -> None:
    """Take a detected finding's numbers, evidence and chart point into its incident."""
    incident.finding_count += 1
    incident.last_seen_at = now
    incident.last_detected_at = now
    incident.updated_at = now
    incident.quiet_windows = 0
    incident.last_score = finding.score
    incident.peak_score = (
        max(incident.peak_score, finding.score) if incident.finding_count > 1 else finding.score
    )
    incident.threshold = finding.threshold
    incident.effect_size = finding.effect_size
    incident.p_value = finding.p_value
    incident.model_version = finding.model_version or incident.model_version
    incident.evidence = evidence_snapshot(finding, settings.evidence_max_bytes)
    incident.chart = chart_with(incident, finding, settings.chart_points)


def evidence_snapshot(finding: Finding, max_bytes: int) -> dict[str, Any]:
    """The finding's evidence as JSON, cut to ``max_bytes`` when it is larger.

    A cut snapshot keeps an excerpt and, when they fit in the other half, the clusters
    and error analysis of the affected examples whole: on-call reads them first.
    """
    snapshot: dict[str, Any] = {
        "finding_id": finding.finding_id,
        "detector": finding.detector,
        "window_start": finding.window_start.isoformat() if finding.window_start else None,
        "window_end": finding.window_end.isoformat() if finding.window_end else None,
        "score": finding.score,
        "threshold": finding.threshold,
        "p_value": finding.p_value,
        "effect_size": finding.effect_size,
        "n_seen": finding.n_seen,
        "details": finding.evidence,
    }
    encoded = json.dumps(snapshot, default=str)
    if len(encoded) > max_bytes:
        half = max_bytes // 2
        details: dict[str, Any] = {
            "truncated": True,
            "original_bytes": len(encoded),
            "excerpt": encoded[:half],
        }
        analysis = {
            key: finding.evidence[key]
            for key in ("clusters", "error_analysis")
            if finding.evidence.get(key)
        }
        if analysis and len(json.dumps(analysis, default=str)) < half - 512:
            details.update(analysis)
        snapshot["details"] = details
    return json.loads(json.dumps(snapshot, default=str))


def chart_with(incident: Incident, finding: Finding, points: int) -> list[dict[str, Any]]:
    """The incident's score chart with the finding's point added, the last ``points`` kept."""
    at = finding.window_end or finding.emitted_at
    point = {"at": at.isoformat(), "score": finding.score, "detected": finding.detected}
    return [*incident.chart, point][-points:]
