"""Model cards: what a version is, what it learnt from, how it was judged, where it went.

:func:`model_card` renders one version's card in Markdown from the registry alone: the
version row (base, adapter, lineage, the gate's metrics), the job that made it (strategy,
training parameters, the verdict), the dataset's manifest from the artifact store (counts
per class and per segment, time range, content hash, what privacy left out, up-weighting),
the incidents that led to it (titles from the incident table) and its rollouts. The text is
deterministic (sorted, fixed decimals, no "generated at"): the same registry gives the
same card, so a card can be diffed and checked. :func:`card_facts` is the same content as
JSON (``genmon models card --json``).

A version recorded by a job gets its card as ``card.md`` inside the adapter's folder
(:func:`write_card`), so the card travels with the weights wherever they are copied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlmodel import col, or_, select

from genmon.db import session_scope
from genmon.retrain.gate import BEHAVIOUR_SIGNALS, SCORED_METRICS

if TYPE_CHECKING:
    from genmon.retrain.artifacts import ArtifactStore
    from genmon.retrain.gate import Verdict

#: The card's sections, in order (each a ``## `` heading).
SECTIONS = (
    "Base and adapter",
    "Training",
    "Data",
    "Evaluation",
    "Gate verdict",
    "Incidents",
    "Rollouts and aliases",
)
#: Manifest keys the Data section renders by name; any other key is listed as it is.
_KNOWN_MANIFEST = {
    "format",
    "content_hash",
    "merge_rule",
    "trigger",
    "sizes",
    "counts",
    "time_range",
    "split",
    "redacted",
    "upweight",
    "strategy",
}
CARD_FILE = "card.md"


# -- facts ----------------------------------------------------------------------------------
def card_facts(
    engine: Engine,
    store: ArtifactStore,
    model_id: str,
    version: str,
    *,
    verdict: Verdict | None = None,
) -> dict[str, Any]:
    """The card's content as JSON. ``verdict``: the gate's, when the job has not stored it
    yet (a job writes the card before it finishes)."""
    from genmon.retrain.registry import adapter_uri, aliases, get_version
    from genmon.schemas.tables import RetrainJob

    row = get_version(engine, model_id, version)
    with session_scope(engine) as session:
        job = session.get(RetrainJob, row.job_id) if row.job_id else None
        job_facts = _job(job) if job is not None else None
        dataset_uri = job.dataset_uri if job is not None else None
        stored = dict(job.verdict) if job is not None and job.verdict else {}
    given = verdict.to_json() if verdict is not None else stored
    data = _data(store, dataset_uri, row.dataset_hash)
    if job_facts is not None and not job_facts["strategy"]:
        job_facts["strategy"] = (data.get("manifest") or {}).get("strategy")
    return {
        "model_id": model_id,
        "version": version,
        "status": row.status.value,
        "created_at": _iso(row.created_at),
        "promoted_at": _iso(row.promoted_at),
        "aliases": sorted(a for a, v in aliases(engine, model_id).items() if v == version),
        "base": {"uri": row.base_uri, "fingerprint": row.base_fingerprint},
        "adapter": {"uri": adapter_uri(row), "parent_version": row.parent_version},
        "job": job_facts,
        "data": data,
        "metrics": dict(row.eval_metrics or {}),
        "verdict": {"decision": given.get("decision"), "reasons": list(given.get("reasons", []))},
        "incidents": _incidents(engine, row.incident_ids or []),
        "rollouts": _rollouts(engine, model_id, version),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _job(job: Any) -> dict[str, Any]:
    params = dict(job.params or {})
    training = dict(params.get("training") or {})
    return {
        "job_id": job.job_id,
        "trigger": job.trigger,
        "trigger_key": job.trigger_key,
        "requested_by": job.requested_by,
        "reason": job.reason,
        "trainer": params.get("trainer"),
        "strategy": params.get("strategy") or training.get("strategy"),
        "params": training,
        "training": dict((job.metrics or {}).get("training") or {}),
        "device_seconds": job.device_seconds,
        "backend": job.backend,
        "dataset_uri": job.dataset_uri,
    }


def _data(store: ArtifactStore, uri: str | None, content_hash: str | None) -> dict[str, Any]:
    if uri is None:
        return {"uri": None, "content_hash": content_hash, "manifest": None}
    try:
        manifest = json.loads(store.get_text(f"{uri.rstrip('/')}/manifest.json"))
    except Exception as exc:  # a card still renders without its dataset
        return {"uri": uri, "content_hash": content_hash, "manifest": None, "error": str(exc)}
    return {"uri": uri, "content_hash": content_hash, "manifest": manifest}


def _incidents(engine: Engine, ids: Sequence[str]) -> list[dict[str, Any]]:
    from genmon.schemas.incidents import Incident

    if not ids:
        return []
    with session_scope(engine) as session:
        found = {i.id: i for i in session.exec(select(Incident).where(col(Incident.id).in_(ids)))}
    out = []
    for incident_id in ids:
        incident = found.get(incident_id)
        if incident is None:
            out.append({"id": incident_id, "title": None})
            continue
        out.append(
            {
                "id": incident_id,
                "title": incident.title,
                "kind": incident.kind.value,
                "signal": incident.signal,
                "segment": incident.segment,
                "severity": incident.severity.value,
                "status": incident.status.value,
            }
        )
    return out


def _rollouts(engine: Engine, model_id: str, version: str) -> list[dict[str, Any]]:
    from genmon.schemas.retrain import Rollout

    query = (
        select(Rollout)
        .where(Rollout.model_id == model_id)
        .where(or_(col(Rollout.challenger) == version, col(Rollout.champion) == version))
        .order_by(col(Rollout.started_at), col(Rollout.rollout_id))
    )
    with session_scope(engine) as session:
        rows = list(session.exec(query))
    return [
        {
            "rollout_id": r.rollout_id,
            "role": "challenger" if r.challenger == version else "champion",
            "champion": r.champion,
            "challenger": r.challenger,
            "share": r.share,
            "status": r.status.value,
            "started_at": _iso(r.started_at),
            "started_by": r.started_by,
            "decided_at": _iso(r.decided_at),
            "decided_by": r.decided_by,
            "reason": r.reason,
        }
        for r in rows
    ]


# -- Markdown -------------------------------------------------------------------------------
def model_card(
    engine: Engine,
    store: ArtifactStore,
    model_id: str,
    version: str,
    *,
    verdict: Verdict | None = None,
) -> str:
    """The Markdown card of ``model_id`` ``version``."""
    return render_card(card_facts(engine, store, model_id, version, verdict=verdict))


def render_card(facts: Mapping[str, Any]) -> str:
    """Markdown from :func:`card_facts`: a title, then :data:`SECTIONS` in order."""
    title = f"# Model card: {facts['model_id']} {facts['version']}"
    aliases = ", ".join(facts["aliases"]) or "none"
    head = [
        title,
        "",
        f"- status: {facts['status']}; aliases: {aliases}",
        f"- created: {facts['created_at']}; promoted: {facts['promoted_at'] or '-'}",
    ]
    bodies = {
        "Base and adapter": _base(facts),
        "Training": _training(facts.get("job")),
        "Data": _data_lines(facts["data"]),
        "Evaluation": _evaluation(facts["metrics"]),
        "Gate verdict": _verdict(facts["verdict"]),
        "Incidents": _incident_lines(facts["incidents"]),
        "Rollouts and aliases": _rollout_lines(facts["rollouts"], aliases),
    }
    lines = head
    for name in SECTIONS:
        lines += ["", f"## {name}", "", *bodies[name]]
    return "\n".join(lines).rstrip() + "\n"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4f}"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), ensure_ascii=False)


def _base(facts: Mapping[str, Any]) -> list[str]:
    base, adapter = facts["base"], facts["adapter"]
    lines = [f"- base: `{base['uri']}` (fingerprint `{base['fingerprint'] or '-'}`)"]
    if adapter["uri"] is None:
        lines.append("- adapter: none (this version is the base weights alone)")
    else:
        lines.append(f"- adapter: `{adapter['uri']}` (LoRA)")
    lines.append(f"- parent version: {adapter['parent_version'] or '-'}")
    return lines


def _training(job: Mapping[str, Any] | None) -> list[str]:
    if job is None:
        return ["Not trained by genmon: registered as it is."]
    run = job["training"]
    lines = [
        f"- job: `{job['job_id']}` (trigger {job['trigger']}"
        + (f", {job['trigger_key']}" if job["trigger_key"] else "")
        + f", requested by {job['requested_by']})",
        f"- trainer: {job['trainer'] or '-'}; strategy: {job['strategy'] or '-'}; "
        f"backend: {job['backend']}",
        f"- steps: {_num(run.get('steps'))}; final loss: {_num(run.get('final_loss'))}; "
        f"device seconds: {job['device_seconds']:.1f}",
    ]
    if job["params"]:
        lines.append(f"- params: `{_compact(job['params'])}`")
    return lines


def _data_lines(data: Mapping[str, Any]) -> list[str]:
    lines = [f"- content hash: `{data['content_hash'] or '-'}`"]
    manifest = data.get("manifest")
    if data["uri"] is None:
        return [*lines, "- dataset: none recorded"]
    lines.append(f"- dataset: `{data['uri']}`")
    if manifest is None:
        return [*lines, f"- manifest: unavailable ({data.get('error', 'not found')})"]
    times = manifest.get("time_range") or {}
    lines += [
        f"- format: {manifest.get('format', '-')}; strategy: {manifest.get('strategy') or '-'}",
        f"- time range: {times.get('first') or '-'} .. {times.get('last') or '-'} "
        f"(evaluation from {times.get('eval_first') or '-'})",
        f"- redacted: {manifest.get('redacted', '-')}",
    ]
    if manifest.get("upweight"):
        lines.append(f"- up-weighted: `{_compact(manifest['upweight'])}`")
    sizes = manifest.get("sizes") or {}
    if sizes:
        lines.append("- sizes: " + ", ".join(f"{k} {v}" for k, v in sorted(sizes.items())))
    for key in sorted(set(manifest) - _KNOWN_MANIFEST):
        lines.append(f"- {key}: `{_compact(manifest[key])}`")
    return lines + _counts(manifest.get("counts") or {})


def _counts(counts: Mapping[str, Any]) -> list[str]:
    """One table per kind of count (per class, per segment), a column per split."""
    splits = [s for s in ("all", "train", "eval") if s in counts]
    kinds = sorted({kind for s in splits for kind in counts[s]})
    lines: list[str] = []
    for kind in kinds:
        keys = sorted({key for s in splits for key in counts[s].get(kind, {})})
        lines += ["", f"Examples per {kind}:", "", f"| {kind} | " + " | ".join(splits) + " |"]
        lines.append("|---" * (len(splits) + 1) + "|")
        for key in keys:
            cells = [str(counts[s].get(kind, {}).get(key, 0)) for s in splits]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


_HEADER = ["| metric | serving | candidate | change | CI of the change | n | status |"]
_HEADER.append("|---|---|---|---|---|---|---|")


def _row(name: str, m: Mapping[str, Any]) -> str:
    ci = m.get("ci") or [None, None]
    level = m.get("confidence")
    shown = f"{level * 100:.4g}%: " if isinstance(level, float) else ""
    interval = f"{shown}{_num(ci[0])} .. {_num(ci[1])}"
    cells = [name, _num(m.get("serving")), _num(m.get("candidate")), _num(m.get("change"))]
    return "| " + " | ".join([*cells, interval, _num(m.get("n")), str(m.get("status"))]) + " |"


def _evaluation(metrics: Mapping[str, Any]) -> list[str]:
    if not metrics:
        return ["No gate metrics recorded."]
    names = [m for m in (*SCORED_METRICS, *BEHAVIOUR_SIGNALS) if isinstance(metrics.get(m), dict)]
    lines = [f"Evaluation examples: {metrics.get('eval_examples', '-')}.", "", *_HEADER]
    lines += [_row(name, metrics[name]) for name in names]
    segments = metrics.get("segments")
    if isinstance(segments, dict):
        lines += _segment_lines(segments)
    upweighted = metrics.get("upweighted_segment")
    if isinstance(upweighted, dict):
        where = ", ".join(f"{k}={v}" for k, v in sorted(upweighted["segment"].items()))
        lines += ["", f"Up-weighted segment {where}:", "", *_HEADER]
        lines += [_row(n, m) for n, m in sorted(upweighted["metrics"].items())]
    golden = metrics.get("golden_set")
    if isinstance(golden, dict):
        lines += ["", f"Golden regression set `{golden.get('source') or '-'}`:", "", *_HEADER]
        lines.append(_row("completion_loss", golden))
    servable = metrics.get("servable")
    if isinstance(servable, dict):
        lines += ["", f"Servable: {servable.get('reason', '-')}"]
    return lines


def _segment_lines(segments: Mapping[str, Any]) -> list[str]:
    level = segments.get("test_confidence")
    each = f"{level * 100:.4g}%" if isinstance(level, float) else "-"
    correction = str(segments.get("correction", "-")).capitalize()
    lines = [
        "",
        f"Per segment ({segments.get('tests', 0)} tests, {correction}: each at {each}, "
        f"tolerance {_num(segments.get('tolerance'))}):",
    ]
    judged = segments.get("judged") or {}
    if judged:
        lines += ["", *_HEADER]
        for metric in sorted(judged):
            for name in sorted(judged[metric]):
                lines.append(_row(f"{metric} on {name}", judged[metric][name]))
    small = segments.get("not_judged") or {}
    for metric in sorted(small):
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(small[metric].items()))
        lines.append(f"- not judged (too few items) for {metric}: {listed}")
    return lines


def _verdict(verdict: Mapping[str, Any]) -> list[str]:
    if not verdict.get("decision"):
        return ["No verdict recorded."]
    return [f"Decision: **{verdict['decision']}**", "", *(f"- {r}" for r in verdict["reasons"])]


def _incident_lines(incidents: Sequence[Mapping[str, Any]]) -> list[str]:
    if not incidents:
        return ["None: this version was not made in answer to an incident."]
    lines = []
    for i in incidents:
        if i["title"] is None:
            lines.append(f"- `{i['id']}` (not in the incident table)")
            continue
        segment = f" on {i['segment']}" if i.get("segment") else ""
        lines.append(
            f"- `{i['id']}`: {i['title']} ({i['kind']}, {i['signal']}{segment}, "
            f"{i['severity']}, {i['status']})"
        )
    return lines


def _rollout_lines(rollouts: Sequence[Mapping[str, Any]], aliases: str) -> list[str]:
    lines = [f"Aliases now: {aliases}."]
    if not rollouts:
        return [*lines, "", "No rollouts."]
    lines += ["", "| rollout | role | champion | challenger | share | status | started | decided |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rollouts:
        decided = f"{r['decided_at']} by {r['decided_by']}" if r["decided_at"] else "-"
        cells = [r["rollout_id"], r["role"], r["champion"], r["challenger"], f"{r['share']:.2%}"]
        cells += [r["status"], f"{r['started_at']} by {r['started_by']}", decided]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- storing --------------------------------------------------------------------------------
def write_card(store: ArtifactStore, artifact_uri: str, text: str) -> str:
    """Write ``text`` as ``card.md`` inside the adapter folder ``artifact_uri``; its URI."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(artifact_uri, **store.storage_options)
    target = f"{str(path).rstrip('/')}/{CARD_FILE}"
    fs.pipe_file(target, text.encode("utf-8"))
    return f"{artifact_uri.rstrip('/')}/{CARD_FILE}"
