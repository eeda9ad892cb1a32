"""The incident manager on a real database (SQLite file, and PostgreSQL with -m postgres)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from incident_support import (
    FakeClock,
    finding,
    settings_with,
    webhook,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from genmon.db import session_scope
from genmon.incidents.assessment import severity_for
from genmon.incidents.exceptions import IncidentNotFoundError, InvalidTransitionError
from genmon.incidents.manager import IncidentManager
from genmon.schemas import IncidentStatus, Severity
from genmon.schemas.incidents import (
    FindingSeen,
    Incident,
    IncidentTransition,
    Notification,
    NotificationEvent,
    NotificationStatus,
    Silence,
    Transition,
)
from genmon.settings import RunbookSettings

HOOK = webhook("hook", "http://127.0.0.1:9/hook")


def _count(engine: Engine, model: type, *where: object) -> int:
    with Session(engine) as session:
        query = select(func.count()).select_from(model)
        for clause in where:
            query = query.where(clause)  # type: ignore[arg-type]
        return int(session.exec(query).one())


def _triggers(engine: Engine) -> int:
    return _count(engine, Notification, Notification.event == NotificationEvent.TRIGGER)


def _incidents(engine: Engine) -> list[Incident]:
    with Session(engine) as session:
        return list(session.exec(select(Incident).order_by(Incident.opened_at)).all())


def test_thousand_findings_and_replay_after_restart_give_one_incident_one_trigger(
    engine: Engine,
) -> None:
    # 500 windows, each finding delivered twice (at-least-once), then all 1,000 replayed
    # by a "restarted worker": a fresh manager and a fresh engine on the same database.
    findings = [finding(window) for window in range(500) for _ in range(2)]
    first = IncidentManager(engine, settings_with(HOOK))
    actions = [first.process(f).action for f in findings]
    assert actions.count("opened") == 1
    assert actions.count("duplicate") == 500

    restarted_engine = sa.create_engine(engine.url)
    restarted = IncidentManager(restarted_engine, settings_with(HOOK))
    assert {restarted.process(f).action for f in findings} == {"duplicate"}
    restarted_engine.dispose()

    incidents = _incidents(engine)
    assert len(incidents) == 1
    assert incidents[0].finding_count == 500
    assert _triggers(engine) == 1
    assert _count(engine, FindingSeen) == 500


def test_two_fingerprints_give_two_incidents_each_paged_once(engine: Engine) -> None:
    # Within the group window: linked as related, yet each pages on its own.
    manager = IncidentManager(engine, settings_with(HOOK))
    for window in range(50):
        manager.process(finding(window, signal="latency_ms"))
        manager.process(finding(window, signal="error_rate"))
    assert len(_incidents(engine)) == 2
    assert _triggers(engine) == 2


def test_two_detectors_on_one_signal_are_two_problems(engine: Engine) -> None:
    """The detector is part of the fingerprint: a CUSUM and a threshold on one signal
    of one model and segment page as two incidents, not one update of the other."""
    manager = IncidentManager(engine, settings_with(HOOK))
    first = manager.process(finding(0, detector="rate_cusum", signal="error_rate"))
    second = manager.process(finding(0, detector="threshold", signal="error_rate"))
    assert first.action == second.action == "opened"
    assert first.incident_id != second.incident_id
    assert len(_incidents(engine)) == 2 and _triggers(engine) == 2


def test_concurrent_workers_open_one_incident(engine: Engine) -> None:
    # Two workers race on the same fingerprint; the partial unique index decides.
    managers = [IncidentManager(engine, settings_with(HOOK)) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(manager: IncidentManager, offset: int) -> None:
        barrier.wait()
        try:
            for window in range(offset, 200, 2):
                manager.process(finding(window))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m, i)) for i, m in enumerate(managers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(_incidents(engine)) == 1
    assert _incidents(engine)[0].finding_count == 200
    assert _triggers(engine) == 1


def test_database_refuses_a_second_open_incident_per_fingerprint(engine: Engine) -> None:
    def incident(status: IncidentStatus) -> Incident:
        return Incident(
            fingerprint="f" * 32, model_id="m", detector="d", kind="drift", signal="s",
            title="t", status=status,
        )  # fmt: skip

    with session_scope(engine) as session:
        session.add(incident(IncidentStatus.RESOLVED))
        session.add(incident(IncidentStatus.RESOLVED))
        session.add(incident(IncidentStatus.OPEN))
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(incident(IncidentStatus.ACKNOWLEDGED))


def test_quiet_windows_auto_resolve_with_hysteresis(engine: Engine) -> None:
    clock = FakeClock()
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    manager.process(finding(0))
    manager.process(finding(1, detected=False))
    manager.process(finding(2, detected=False))
    manager.process(finding(3))  # a detection resets the quiet count
    manager.process(finding(4, detected=False))
    manager.process(finding(5, detected=False))
    assert _incidents(engine)[0].status is IncidentStatus.OPEN
    outcome = manager.process(finding(6, detected=False))
    assert outcome.action == "resolved"
    (incident,) = _incidents(engine)
    assert incident.status is IncidentStatus.RESOLVED
    with Session(engine) as session:
        events = session.exec(select(Notification.event).order_by(Notification.id)).all()
        last = session.exec(
            select(IncidentTransition).order_by(IncidentTransition.id.desc())
        ).first()
    assert events == [NotificationEvent.TRIGGER, NotificationEvent.RESOLVE]
    assert last is not None and last.actor == "genmon" and "3 clear windows" in last.reason


def test_clear_windows_without_an_open_incident_change_nothing(engine: Engine) -> None:
    manager = IncidentManager(engine, settings_with(HOOK))
    assert manager.process(finding(0, detected=False)).action == "ignored"
    assert _incidents(engine) == []
    assert _count(engine, FindingSeen) == 0


def test_reopen_within_cooldown_is_the_same_incident(engine: Engine) -> None:
    clock = FakeClock()
    settings = settings_with(HOOK, incidents={"reopen_cooldown_s": 600, "flap_max_reopens": 5})
    manager = IncidentManager(engine, settings, clock=clock)
    opened = manager.process(finding(0))
    manager.resolve(str(opened.incident_id), actor="alice", reason="fixed")
    clock.advance(300)
    reopened = manager.process(finding(1))
    assert reopened.action == "reopened"
    assert reopened.incident_id == opened.incident_id
    (incident,) = _incidents(engine)
    assert incident.status is IncidentStatus.OPEN and incident.reopen_count == 1
    # Destinations were told it resolved: the reopening pages them again.
    assert reopened.notifications == 1
    assert [event for event, _ in _pages(engine, incident.id)] == [
        NotificationEvent.TRIGGER,
        NotificationEvent.RESOLVE,
        NotificationEvent.TRIGGER,
    ]
    # After the cool-down the same fingerprint is a new problem.
    manager.resolve(incident.id, actor="alice")
    clock.advance(601)
    assert manager.process(finding(2)).action == "opened"
    assert len(_incidents(engine)) == 2


def test_flapping_incident_stays_open_until_quiet_for_the_cooldown(engine: Engine) -> None:
    clock = FakeClock()
    settings = settings_with(
        HOOK,
        incidents={
            "reopen_cooldown_s": 600,
            "flap_max_reopens": 2,
            "auto_resolve_quiet_windows": 1,
        },
    )
    manager = IncidentManager(engine, settings, clock=clock)
    window = 0
    for _ in range(3):  # open, then reopen twice -> flapping
        manager.process(finding(window))
        clock.advance(60)
        manager.process(finding(window + 1, detected=False))
        window += 2
    (incident,) = _incidents(engine)
    assert incident.reopen_count == 2 and incident.flapping
    assert incident.status is IncidentStatus.OPEN  # the last quiet window did not resolve it
    clock.advance(600)
    assert manager.process(finding(window, detected=False)).action == "resolved"
    # 1 open + 2 reopens paged; the flapping incident did not add more.
    assert _triggers(engine) == 3


def _payloads(engine: Engine, incident_id: str | None) -> list[dict[str, Any]]:
    """Payloads of an incident's pages, oldest first."""
    with Session(engine) as session:
        query = (
            select(Notification.payload)
            .where(Notification.incident_id == incident_id)
            .order_by(Notification.id)
        )
        return list(session.exec(query).all())


def test_a_related_problem_is_linked_and_pages_as_itself(engine: Engine) -> None:
    clock = FakeClock()
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    first = manager.process(finding(0, signal="latency_ms"))
    clock.advance(60)
    second = manager.process(finding(1, signal="error_rate"))
    other_model = manager.process(finding(1, model_id="search"))
    assert (first.action, second.action, other_model.action) == ("opened", "opened", "opened")
    assert second.notifications == 1
    with Session(engine) as session:
        stored = {i.id: i for i in session.exec(select(Incident)).all()}
    assert stored[str(second.incident_id)].parent_id == first.incident_id
    assert stored[str(other_model.incident_id)].parent_id is None
    # The first incident gets no "update" about the second: each is a page of its own.
    assert [event for event, _ in _pages(engine, first.incident_id)] == [NotificationEvent.TRIGGER]
    assert [event for event, _ in _pages(engine, second.incident_id)] == [NotificationEvent.TRIGGER]
    (trigger,) = _payloads(engine, second.incident_id)
    assert trigger["incident"]["parent_id"] == first.incident_id
    assert trigger["incident"]["related"] == [first.incident_id]
    assert f"related to open incident {first.incident_id}" in trigger["reason"]
    # Resolving one leaves the other open and unpaged; each resolves on its own.
    manager.resolve(str(first.incident_id), actor="bob")
    assert [event for event, _ in _pages(engine, second.incident_id)] == [NotificationEvent.TRIGGER]
    assert _payloads(engine, first.incident_id)[-1]["incident"]["related"] == [second.incident_id]
    manager.resolve(str(second.incident_id), actor="bob")
    assert [event for event, _ in _pages(engine, second.incident_id)] == [
        NotificationEvent.TRIGGER,
        NotificationEvent.RESOLVE,
    ]


def test_incidents_outside_the_group_window_are_not_linked(engine: Engine) -> None:
    clock = FakeClock()
    settings = settings_with(HOOK, incidents={"group_window_s": 300})
    manager = IncidentManager(engine, settings, clock=clock)
    manager.process(finding(0, signal="latency_ms"))
    clock.advance(301)
    later = manager.process(finding(5, signal="error_rate"))
    assert later.action == "opened" and later.notifications == 1
    (trigger,) = _payloads(engine, later.incident_id)
    assert trigger["incident"]["parent_id"] is None and trigger["incident"]["related"] == []


def test_a_reopened_related_incident_pages_its_own_trigger(engine: Engine) -> None:
    clock = FakeClock()
    manager = IncidentManager(
        engine, settings_with(HOOK, incidents={"auto_resolve_quiet_windows": 1}), clock=clock
    )
    first = manager.process(finding(0, signal="latency_ms"))
    second = manager.process(finding(0, signal="error_rate"))
    assert second.action == "opened"
    manager.process(finding(1, signal="error_rate", detected=False))  # the second resolves
    clock.advance(60)
    # Reopened while the first is open: its own trigger again, under its own id.
    assert manager.process(finding(2, signal="error_rate")).action == "reopened"
    assert [event for event, _ in _pages(engine, second.incident_id)] == [
        NotificationEvent.TRIGGER,
        NotificationEvent.RESOLVE,
        NotificationEvent.TRIGGER,
    ]
    assert [event for event, _ in _pages(engine, first.incident_id)] == [NotificationEvent.TRIGGER]
    reopened = _payloads(engine, second.incident_id)[-1]
    assert reopened["reason"].startswith("reopened")
    assert reopened["incident"]["related"] == [first.incident_id]


def test_a_findings_own_severity_and_title_are_used(engine: Engine) -> None:
    manager = IncidentManager(engine, settings_with(HOOK))
    title = "TTFT p95 2.4 s, baseline 0.6 s, support-bot v3, locale=de"
    # By its score the bands would say critical; the detector's judgement wins.
    own = finding(0, score=5.0).model_copy(update={"severity": Severity.WARNING, "title": title})
    manager.process(own)
    (incident,) = _incidents(engine)
    assert (incident.severity, incident.title) == (Severity.WARNING, title)
    (trigger,) = _payloads(engine, incident.id)
    assert trigger["incident"]["title"] == title and trigger["labels"]["severity"] == "warning"
    # Without them, the bands and the generic title, as before.
    manager.process(finding(0, signal="error_rate", score=5.0))
    generic = next(i for i in _incidents(engine) if i.signal == "error_rate")
    assert generic.severity is Severity.CRITICAL
    assert generic.title == "anomaly on chat: page_hinkley flagged error_rate"


def test_an_escalation_takes_the_newer_findings_severity_and_title(engine: Engine) -> None:
    manager = IncidentManager(engine, settings_with(HOOK))
    mild = finding(0).model_copy(
        update={"severity": Severity.WARNING, "title": "error rate 2%, baseline 0.5%"}
    )
    worse = finding(1).model_copy(
        update={"severity": Severity.CRITICAL, "title": "error rate 31%, baseline 0.5%"}
    )
    same = finding(2).model_copy(
        update={"severity": Severity.CRITICAL, "title": "error rate 30%, baseline 0.5%"}
    )
    manager.process(mild)
    assert manager.process(worse).notifications == 1
    assert manager.process(same).notifications == 0  # not worse: no page, title kept
    (incident,) = _incidents(engine)
    assert incident.severity is Severity.CRITICAL
    assert incident.title == "error rate 31%, baseline 0.5%"
    trigger, update = _payloads(engine, incident.id)
    assert trigger["incident"]["title"] == "error rate 2%, baseline 0.5%"
    assert update["event"] == "update"
    assert update["incident"]["title"] == "error rate 31%, baseline 0.5%"
    assert update["reason"] == "escalated warning -> critical: error rate 31%, baseline 0.5%"
    with Session(engine) as session:
        escalated = session.exec(
            select(IncidentTransition.reason).where(
                IncidentTransition.transition == Transition.ESCALATED
            )
        ).one()
    assert escalated.startswith("escalated warning -> critical: error rate 31%")


def test_a_related_incident_id_is_not_redacted_but_a_secret_beside_it_is(engine: Engine) -> None:
    clock = FakeClock()
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    secret = "sk-proj-AbCdEfGhIjKlMnOpQrStUv"
    leaky = finding(0).model_copy(update={"title": f"refusals after prompts with {secret}"})
    first = manager.process(leaky)
    clock.advance(120)
    second = finding(1, signal="error_rate")
    token = "9f8e7d6c5b4a39281706f5e4d3c2b1a0ffeeddcc"  # a long token that is not genmon's own
    second = second.model_copy(update={"evidence": {"note": f"{second.finding_id} {token}"}})
    second_id = manager.process(second).incident_id
    (trigger,) = _payloads(engine, second_id)
    reason = trigger["reason"]
    assert f"related to open incident {first.incident_id}: refusals after prompts" in reason
    assert secret not in reason and reason.endswith("[REDACTED:api_key]")
    assert trigger["incident"]["evidence"]["finding_id"] == second.finding_id
    note = trigger["incident"]["evidence"]["details"]["note"]
    assert note == f"{second.finding_id} [REDACTED:api_key]"
    assert trigger["incident"]["id"] == second_id


def test_repeated_findings_update_counters_peak_and_escalate(engine: Engine) -> None:
    manager = IncidentManager(engine, settings_with(HOOK))
    manager.process(finding(0, score=1.5))
    manager.process(finding(1, score=5.0))
    manager.process(finding(2, score=1.2))
    (incident,) = _incidents(engine)
    assert incident.finding_count == 3
    assert incident.peak_score == 5.0 and incident.last_score == 1.2
    assert incident.severity is Severity.CRITICAL
    with Session(engine) as session:
        events = session.exec(select(Notification.event).order_by(Notification.id)).all()
        transitions = session.exec(select(IncidentTransition.transition)).all()
    assert events == [NotificationEvent.TRIGGER, NotificationEvent.UPDATE]
    assert Transition.ESCALATED in transitions


def test_severity_bands_take_the_worse_of_score_and_effect_size() -> None:
    settings = settings_with().incidents
    assert severity_for(finding(score=1.1, threshold=1.0), settings) is Severity.WARNING
    assert severity_for(finding(score=2.5, threshold=1.0), settings) is Severity.ERROR
    assert severity_for(finding(score=1.1, effect_size=-0.9), settings) is Severity.CRITICAL
    # Detected with a p-value-style score below the ratio band: still at least a warning.
    assert severity_for(finding(score=0.01, threshold=0.05), settings) is Severity.WARNING
    custom = settings.model_copy(update={"severity_score_ratio_bands": {"critical": 1.0}})
    assert severity_for(finding(score=1.0), custom) is Severity.CRITICAL


def test_lifecycle_and_audit_trail(engine: Engine) -> None:
    manager = IncidentManager(engine, settings_with(HOOK))
    incident_id = str(manager.process(finding(0)).incident_id)
    manager.acknowledge(incident_id, actor="alice", reason="looking")
    with pytest.raises(InvalidTransitionError):
        manager.acknowledge(incident_id, actor="alice")
    manager.add_note(incident_id, actor="alice", text="rolled back the prompt template")
    manager.resolve(incident_id, actor="alice", reason="rollback done")
    with pytest.raises(InvalidTransitionError):
        manager.resolve(incident_id, actor="alice")
    with pytest.raises(IncidentNotFoundError):
        manager.acknowledge("nope", actor="alice")
    with Session(engine) as session:
        incident = session.get(Incident, incident_id)
        trail = session.exec(select(IncidentTransition).order_by(IncidentTransition.id)).all()
        events = session.exec(select(Notification.event).order_by(Notification.id)).all()
    assert incident is not None and "rolled back the prompt template" in incident.notes
    assert [(t.transition, t.actor) for t in trail] == [
        (Transition.OPENED, "genmon"),
        (Transition.ACKNOWLEDGED, "alice"),
        (Transition.NOTED, "alice"),
        (Transition.RESOLVED, "alice"),
    ]
    assert trail[1].from_status is IncidentStatus.OPEN
    assert trail[1].to_status is IncidentStatus.ACKNOWLEDGED
    assert trail[3].reason == "rollback done"
    assert events == [
        NotificationEvent.TRIGGER,
        NotificationEvent.ACKNOWLEDGE,
        NotificationEvent.RESOLVE,
    ]


def _silence(engine: Engine, clock: FakeClock, *matchers: str, hours: int = 1) -> str:
    silence = Silence(
        matchers=list(matchers),
        starts_at=clock.now,
        ends_at=clock.now + timedelta(hours=hours),
        created_by="alice",
    )
    with session_scope(engine) as session:
        session.add(silence)
    return silence.id


def _pages(engine: Engine, incident_id: str | None) -> list[tuple[NotificationEvent, str | None]]:
    """(event, silence id) of an incident's notifications, oldest first."""
    with Session(engine) as session:
        query = (
            select(Notification.event, Notification.silenced_by)
            .where(Notification.incident_id == incident_id)
            .order_by(Notification.id)
        )
        return list(session.exec(query).all())


def test_silence_suppresses_notifications_not_incidents(engine: Engine) -> None:
    clock = FakeClock()
    silence_id = _silence(engine, clock, "model=chat", 'severity=~"warning|error"')
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    silenced = manager.process(finding(0, score=1.5))
    loud = manager.process(finding(0, model_id="search", score=1.5))
    assert silenced.notifications == 0 and loud.notifications == 1
    assert len(_incidents(engine)) == 2
    with Session(engine) as session:
        statuses = dict(session.exec(select(Notification.incident_id, Notification.status)).all())
    assert statuses[silenced.incident_id] is NotificationStatus.SUPPRESSED
    assert statuses[loud.incident_id] is NotificationStatus.PENDING
    # The silenced page's resolve stays silent after the silence ended: the receiver never
    # saw that page. Pages queued after the silence flow again.
    clock.advance(3601)
    manager.resolve(str(silenced.incident_id), actor="alice")
    assert _pages(engine, silenced.incident_id) == [
        (NotificationEvent.TRIGGER, silence_id),
        (NotificationEvent.RESOLVE, silence_id),
    ]
    assert manager.process(finding(1, signal="error_rate", score=1.5)).notifications == 1


def test_a_negative_regex_matcher_silences_all_but_what_it_names(engine: Engine) -> None:
    clock = FakeClock()
    _silence(engine, clock, 'model!~"search|chat-v[0-9]+"')
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    held = manager.process(finding(0, model_id="support-bot"))
    named = manager.process(finding(0, model_id="chat-v2"))
    partial = manager.process(finding(0, model_id="chat-v2-beta"))  # anchored: not named
    assert (held.notifications, named.notifications, partial.notifications) == (0, 1, 0)


def test_a_silence_that_starts_later_holds_nothing_before_it_starts(engine: Engine) -> None:
    clock = FakeClock()
    silence = Silence(
        matchers=["model=chat"],
        starts_at=clock.now + timedelta(hours=1),
        ends_at=clock.now + timedelta(hours=2),
        created_by="alice",
    )
    with session_scope(engine) as session:
        session.add(silence)
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    assert manager.process(finding(0, signal="latency_ms")).notifications == 1
    clock.advance(3601)  # inside the silence now
    assert manager.process(finding(61, signal="error_rate")).notifications == 0


def test_acknowledge_and_resolve_follow_a_page_that_went_out_despite_a_silence(
    engine: Engine,
) -> None:
    clock = FakeClock()
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    incident_id = str(manager.process(finding(0)).incident_id)
    clock.advance(60)
    silence_id = _silence(engine, clock, "model=chat")
    manager.acknowledge(incident_id, actor="alice")
    manager.resolve(incident_id, actor="alice")
    # A reopening under the silence is a new page: silenced, and so is its resolve.
    clock.advance(60)
    reopened = manager.process(finding(1))
    assert (reopened.action, reopened.notifications) == ("reopened", 0)
    manager.resolve(incident_id, actor="alice")
    assert _pages(engine, incident_id) == [
        (NotificationEvent.TRIGGER, None),
        (NotificationEvent.ACKNOWLEDGE, None),
        (NotificationEvent.RESOLVE, None),
        (NotificationEvent.TRIGGER, silence_id),
        (NotificationEvent.RESOLVE, silence_id),
    ]


def test_evidence_chart_and_runbook_are_kept_bounded(engine: Engine) -> None:
    settings = settings_with(
        HOOK,
        incidents={
            "chart_points": 5,
            "evidence_max_bytes": 1024,
            "runbooks": {
                "anomaly": RunbookSettings(url="https://runbooks/anomaly", remediation=["a", "b"])
            },
        },
    )
    manager = IncidentManager(engine, settings)
    for window in range(12):
        manager.process(finding(window, evidence={"samples": ["x" * 100] * 50}))
    (incident,) = _incidents(engine)
    assert len(incident.chart) == 5
    assert incident.chart[-1]["score"] == 2.0 and incident.chart[-1]["detected"] is True
    assert incident.evidence["details"]["truncated"] is True
    assert incident.evidence["score"] == 2.0
    assert incident.runbook_url == "https://runbooks/anomaly"
    assert incident.remediation == ["a", "b"]
    with Session(engine) as session:
        payload = session.exec(select(Notification.payload)).first()
    assert payload is not None
    assert payload["runbook"] == {"url": "https://runbooks/anomaly", "remediation": ["a", "b"]}


def test_notification_payload_is_redacted_and_truncated(engine: Engine) -> None:
    settings = settings_with(HOOK, notify={"max_text_chars": 60})
    manager = IncidentManager(engine, settings)
    evidence = {
        "prompt": "my card is 4111 1111 1111 1111, mail me at jo@example.org " + "y" * 200,
        "response": "call +44 20 7946 0958",
    }
    manager.process(finding(0, evidence=evidence))
    with Session(engine) as session:
        payload = session.exec(select(Notification.payload)).one()
    details = payload["incident"]["evidence"]["details"]
    text = str(payload)
    assert "4111" not in text and "jo@example.org" not in text and "7946" not in text
    assert "[REDACTED:card]" in details["prompt"] and "[REDACTED:email]" in details["prompt"]
    assert details["response"] == "call [REDACTED:phone]"
    assert "chars]" in details["prompt"] and len(details["prompt"]) < 100
    # The incident itself keeps the evidence for investigation.
    assert "4111 1111 1111 1111" in _incidents(engine)[0].evidence["details"]["prompt"]


def test_prune_seen_forgets_old_dedup_keys(engine: Engine) -> None:
    clock = FakeClock()
    settings = settings_with(HOOK, incidents={"finding_dedup_retention_s": 3600})
    manager = IncidentManager(engine, settings, clock=clock)
    manager.process(finding(0))
    clock.advance(1800)
    manager.process(finding(1))
    clock.advance(2000)
    assert manager.prune_seen() == 1
    assert _count(engine, FindingSeen) == 1


def test_a_batch_in_one_transaction_equals_one_by_one(engine: Engine) -> None:
    clock = FakeClock()
    manager = IncidentManager(engine, settings_with(HOOK), clock=clock)
    batch = [finding(w) for w in range(20)] + [finding(w) for w in range(20)]
    batch += [finding(20 + w, detected=False) for w in range(3)]
    outcomes = manager.process_many(batch)
    assert [o.action for o in outcomes].count("duplicate") == 20
    assert outcomes[-1].action == "resolved"
    assert manager.process_many(batch) == [type(outcomes[0])("duplicate")] * len(batch)
    (incident,) = _incidents(engine)
    assert incident.finding_count == 20 and incident.status is IncidentStatus.RESOLVED
    with Session(engine) as session:
        events = session.exec(select(Notification.event).order_by(Notification.id)).all()
    assert events == [NotificationEvent.TRIGGER, NotificationEvent.RESOLVE]


def _versioned(window: int, version: str, **fields: Any) -> Any:
    return finding(window, segment=f"model_version={version}", **fields).model_copy(
        update={"model_version": version}
    )


def test_the_champion_that_replaced_a_failing_version_resolves_its_incident(
    engine: Engine,
) -> None:
    from genmon.schemas.retrain import ModelAliasRow

    manager = IncidentManager(engine, settings_with(HOOK))
    opened = manager.process(_versioned(0, "v1"))
    # v2 is clear but nothing says it replaced v1: v1's incident is v1's business.
    assert manager.process(_versioned(1, "v2", detected=False)).action == "ignored"
    with session_scope(engine) as session:
        session.add(ModelAliasRow(model_id="chat", alias="champion", version="v2"))
    # A window that is not detected but still rising is not clear: it resets the count.
    manager.process(_versioned(2, "v2", detected=False))
    manager.process(_versioned(3, "v2", detected=False, evidence={"elevated": True}))
    manager.process(_versioned(4, "v2", detected=False))
    manager.process(_versioned(5, "v2", detected=False))
    assert _incidents(engine)[0].status is IncidentStatus.OPEN
    outcome = manager.process(_versioned(6, "v2", detected=False))
    assert (outcome.action, outcome.incident_id) == ("resolved", opened.incident_id)
    with Session(engine) as session:
        last = session.exec(
            select(IncidentTransition).order_by(IncidentTransition.id.desc())
        ).first()
    assert last is not None and "of v2, which replaced v1 as champion" in last.reason
