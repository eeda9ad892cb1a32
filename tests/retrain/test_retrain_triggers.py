"""Triggers to jobs on SQLite and PostgreSQL: one job per trigger whatever is redelivered or
raced, and a recorded reason for every job not queued (guards included)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import retrain_support_triggers as support
from click.testing import CliRunner
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli.retrain import retrain
from genmon.retrain.exceptions import JobNotFound, JobStateError
from genmon.retrain.policy import parse_policy
from genmon.retrain.triggers import (
    approve,
    decide_incident,
    decide_volume,
    explain,
    incident_key,
    manual_request,
    not_registered,
    open_undecided,
    store_request,
)
from genmon.schemas.events import RetrainRequest, RetrainStatus, TriggerKind, job_id_for, utcnow
from genmon.schemas.retrain import DecisionOutcome, RetrainJobAudit
from genmon.schemas.tables import RetrainJob
from genmon.settings import get_settings


def test_an_unregistered_models_incident_is_not_retrainable(engine: Engine) -> None:
    incident_id = support.incident(engine, "ghost")
    policy = support.policy()
    assert decide_incident(engine, policy, incident_id) is None
    assert decide_incident(engine, policy, incident_id) is None  # redelivered: decided once
    [decision] = support.decisions(engine, "ghost")
    assert decision.outcome is DecisionOutcome.REFUSED
    assert decision.trigger_key == incident_key(incident_id, 0)
    assert decision.reason == (
        "not retrainable: model ghost is not registered (genmon models register ghost --base PATH)"
    )
    # A request that reaches the store anyway is refused the same way.
    refused = store_request(engine, policy, manual_request("ghost", "v1", "please"))
    assert (refused.outcome, refused.reason) == (DecisionOutcome.REFUSED, not_registered("ghost"))
    assert support.jobs(engine) == []


def test_a_matching_incident_gives_one_job_however_often_it_is_delivered(engine: Engine) -> None:
    support.register(engine, "bot")
    incident_id = support.incident(engine, "bot", segment="model_version=v1,locale=de")
    policy = support.policy(max_attempts=5)
    request = decide_incident(engine, policy, incident_id)
    assert request is not None
    assert request.trigger is TriggerKind.INCIDENT
    assert request.trigger_key == f"incident:{incident_id}:0"
    assert request.job_id == job_id_for(request.trigger_key)
    assert (request.base_version, request.incident_id) == ("v1", incident_id)
    assert request.context["segment_attributes"] == {"model_version": "v1", "locale": "de"}
    twice = decide_incident(engine, policy, incident_id)  # redelivered before the store:
    assert twice is not None and twice.job_id == request.job_id  # the same job again
    first = store_request(engine, policy, request)
    again = store_request(engine, policy, request)
    assert first.id == again.id and first.outcome is DecisionOutcome.ENQUEUED
    [job] = support.jobs(engine)
    assert (job.job_id, job.status, job.max_attempts) == (request.job_id, RetrainStatus.QUEUED, 5)
    assert job.params["trainer"] == "lora" and job.params["gate"]["min_eval_examples"] == 20
    assert job.context["signal"] == "refusal_rate"
    assert decide_incident(engine, policy, incident_id) is None  # decided: no new request
    with Session(engine) as session:
        audit = session.exec(select(RetrainJobAudit)).all()
    assert [(a.job_id, a.to_status) for a in audit] == [(job.job_id, "queued")]


def test_an_incident_no_trigger_matches_is_ignored_with_the_closest_reason(
    engine: Engine,
) -> None:
    support.register(engine, "bot")
    slow = support.incident(engine, "bot", signal="latency", detector="page_hinkley")
    assert decide_incident(engine, support.policy(), slow) is None
    [decision] = support.decisions(engine, "bot")
    assert decision.outcome is DecisionOutcome.IGNORED
    assert decision.reason == (
        "no incident trigger of the policy (test-policy.yaml) matches; the closest,"
        " triggers.incidents[0] 'refusals': signal latency is not refusal_rate"
    )
    assert open_undecided(engine) == []  # final: never decided again


def test_an_incident_waits_for_its_firings_and_fires_later(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy(incidents=[{**support.REFUSALS, "after_firings": 3}])
    incident_id = support.incident(engine, "bot", finding_count=1)
    assert decide_incident(engine, policy, incident_id) is None
    assert decide_incident(engine, policy, incident_id) is None
    [waiting] = support.decisions(engine, "bot")
    assert waiting.outcome is DecisionOutcome.IGNORED
    assert waiting.reason.startswith("waiting: refusals fires after 3 findings; the incident has 1")
    assert open_undecided(engine) == [incident_id]
    support.set_findings(engine, incident_id, 3)
    request = decide_incident(engine, policy, incident_id)
    assert request is not None and request.context["finding_count"] == 3
    assert store_request(engine, policy, request).outcome is DecisionOutcome.ENQUEUED
    assert open_undecided(engine) == []


def test_the_cool_down_refuses_automatic_triggers_with_the_reason(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy(cooldown_s=3600)
    first = decide_incident(engine, policy, support.incident(engine, "bot"))
    assert first is not None
    store_request(engine, policy, first)
    [job] = support.jobs(engine)

    second_id = support.incident(engine, "bot")
    assert decide_incident(engine, policy, second_id) is None
    held = support.decisions(engine, "bot")[-1]
    assert held.outcome is DecisionOutcome.REFUSED
    assert held.reason.startswith(f"cool-down: job {job.job_id} of bot was created ")
    assert "guards.cooldown_s is 3600 s (test-policy.yaml)" in held.reason
    assert open_undecided(engine) == [second_id]  # not final: decided again later
    # A request that reaches the store inside the cool-down is refused for good ...
    later = decide_incident(engine, policy, second_id, clock=lambda: utcnow() + timedelta(hours=2))
    assert later is not None
    stored = store_request(engine, policy, later)
    assert stored.outcome is DecisionOutcome.REFUSED and stored.reason.startswith("cool-down")
    # ... and once it is over, or when a person asks, a job is queued.
    assert store_request(engine, policy, manual_request("bot", "v1", "now")).job_id is not None
    assert len(support.jobs(engine)) == 2


def test_too_few_examples_per_class_refuses_with_the_reason(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy(min_examples_per_class=5)
    support.examples(engine, "bot", 6, label="billing")
    support.examples(engine, "bot", 3)
    support.examples(engine, "bot", 9, correction=None)  # thumbs without a correction
    incident_id = support.incident(engine, "bot")
    assert decide_incident(engine, policy, incident_id) is None
    refused = support.decisions(engine, "bot")[-1]
    assert refused.outcome is DecisionOutcome.REFUSED
    assert refused.reason.startswith(
        "too few examples: usable examples (with a correction) by class: unlabelled 3;"
        " guards.min_examples_per_class is 5"
    )
    support.examples(engine, "bot", 2)
    request = decide_incident(engine, policy, incident_id)
    assert request is not None
    assert store_request(engine, policy, request).outcome is DecisionOutcome.ENQUEUED


def test_examples_count_since_the_last_promoted_job(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy(min_examples_per_class=5)
    support.examples(engine, "bot", 8, at=utcnow() - timedelta(hours=2))
    support.examples(engine, "bot", 4, correction=support.REFUSED_ANSWER)  # unchanged answers
    hour_ago = utcnow() - timedelta(hours=1)
    with Session(engine) as session:
        for status, key in ((RetrainStatus.PROMOTED, "a"), (RetrainStatus.REJECTED, "b")):
            session.add(
                RetrainJob(
                    model_id="bot",
                    base_version="v1",
                    status=status,
                    trigger_key=f"manual:{key}",
                    created_at=hour_ago,
                    started_at=hour_ago if status is RetrainStatus.PROMOTED else utcnow(),
                    finished_at=utcnow(),
                )
            )
        session.commit()
    refused = store_request(engine, policy, manual_request("bot", "v1", "more"))
    assert refused.outcome is DecisionOutcome.REFUSED
    assert f"since the last promoted job ({hour_ago.isoformat()}) by class: none;" in (
        refused.reason
    )
    # A rejected job's examples are not in the serving version: they still count.
    support.examples(engine, "bot", 5, at=hour_ago + timedelta(minutes=1))
    assert store_request(engine, policy, manual_request("bot", "v1", "now")).job_id is not None


def test_approval_holds_a_job_until_someone_approves_it(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy(require_approval=True)
    decision = store_request(engine, policy, manual_request("bot", "v1", "fix refusals"))
    assert decision.outcome is DecisionOutcome.PENDING_APPROVAL
    assert decision.reason == (
        f"waits for approval (guards.require_approval): genmon retrain approve {decision.job_id}"
    )
    [job] = support.jobs(engine)
    assert job.status is RetrainStatus.PENDING_APPROVAL
    approved = approve(engine, job.job_id, "alice", "looks right")
    assert (approved.status, approved.approved_by) == (RetrainStatus.QUEUED, "alice")
    with Session(engine) as session:
        audit = session.exec(select(RetrainJobAudit).order_by(RetrainJobAudit.id)).all()
    assert [(a.from_status, a.to_status, a.actor) for a in audit] == [
        (None, "pending_approval", "genmon"),
        ("pending_approval", "queued", "alice"),
    ]
    [after] = support.decisions(engine, "bot")
    assert after.outcome is DecisionOutcome.ENQUEUED
    assert after.reason.endswith("; approved by alice: looks right")
    with pytest.raises(JobStateError, match="is queued, not pending_approval"):
        approve(engine, job.job_id, "bob")
    with pytest.raises(JobNotFound):
        approve(engine, "nope", "bob")


def test_workers_racing_to_store_one_request_make_one_job(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy()
    for round_ in range(3):
        request = manual_request("bot", "v1", f"race {round_}")
        start = threading.Barrier(4)
        results: list[int | None] = []

        def store(request: RetrainRequest, start: threading.Barrier, out: list[int | None]) -> None:
            start.wait()
            out.append(store_request(engine, policy, request).id)

        threads = [threading.Thread(target=store, args=(request, start, results)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(results) == 4 and len(set(results)) == 1
    assert support.count_jobs(engine) == 3


def test_the_volume_trigger_fires_once_per_mark(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = parse_policy(
        "triggers: {volume: {new_examples: 10}}\n"
        "guards: {cooldown_s: 0, min_examples_per_class: 0}\n",
        "volume.yaml",
    )
    support.examples(engine, "bot", 9)
    assert decide_volume(engine, policy, "bot") is None
    support.examples(engine, "bot", 1)
    request = decide_volume(engine, policy, "bot")
    assert request is not None and request.trigger_key == "volume:bot:1"
    store_request(engine, policy, request)
    assert decide_volume(engine, policy, "bot") is None  # nothing new since that job
    support.examples(engine, "bot", 12)
    later = decide_volume(engine, policy, "bot")
    assert later is not None and later.trigger_key == "volume:bot:2"
    assert store_request(engine, policy, later).outcome is DecisionOutcome.ENQUEUED
    assert [d.trigger_key for d in explain(engine, "bot")] == ["volume:bot:2", "volume:bot:1"]


def test_the_cli_requests_approves_lists_shows_explains_and_cancels(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("guards: {min_examples_per_class: 0, require_approval: true}\n")
    monkeypatch.setenv("GENMON_RETRAIN__POLICY_FILE", str(path))
    get_settings.cache_clear()
    monkeypatch.setattr("genmon.cli.retrain.get_settings", get_settings)
    url = engine.url.render_as_string(hide_password=False)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(retrain, [*args, "--url", url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    try:
        missing = runner.invoke(retrain, ["request", "ghost", "--reason", "x", "--url", url])
        assert "genmon models register ghost --base PATH" in str(missing.exception)
        support.register(engine, "bot")
        job_id = run("request", "bot", "--reason", "refuses cards", "--direct").splitlines()[0]
        assert "pending_approval" in run("list", "--model", "bot", "--status", "active")
        assert run("approve", job_id, "--by", "alice").strip() == f"{job_id}: queued"
        shown = run("show", job_id)
        assert "retrain job" in shown and "pending_approval -> queued" in shown
        why = run("why", "bot")
        assert "enqueued" in why and "approved by alice" in why
        assert run("cancel", job_id, "--by", "bob").strip() == f"{job_id}: cancelled (was queued)"
        assert "queued -> cancelled" in run("show", job_id)
        ended = runner.invoke(retrain, ["cancel", job_id, "--url", url])
        assert ended.exit_code == 1 and "nothing to cancel" in str(ended.exception)
    finally:
        get_settings.cache_clear()
