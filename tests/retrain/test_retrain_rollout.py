"""Rollouts on the real databases: a challenger on a share of traffic, one watch per model,
the decisions (confirm, roll back, cancel, inconclusive) moving aliases and statuses in one
transaction, what is refused, the job's release in canary and direct mode, the rollout
watch's incidents never retrained on, and the ``genmon models`` commands
(:mod:`genmon.retrain.rollout`, :mod:`genmon.retrain.job`, :mod:`genmon.cli.models`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import retrain_support_triggers as support
import yaml
from click.testing import CliRunner
from incident_support import migrated_engine, sqlite_url
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from genmon.cli.models import models
from genmon.db import session_scope
from genmon.retrain.artifacts import ArtifactStore
from genmon.retrain.dataset import BuiltDataset
from genmon.retrain.exceptions import (
    ModelNotRegisteredError,
    RolloutError,
    RolloutNotFound,
    VersionNotFoundError,
)
from genmon.retrain.gate import Verdict
from genmon.retrain.job import JobRun, Plan, starting_point
from genmon.retrain.policy import RolloutPolicy, parse_policy
from genmon.retrain.queue import JobQueue, get_job
from genmon.retrain.registry import (
    aliases,
    create_version,
    current_events,
    move_alias,
    promote,
    rollback,
    versions,
)
from genmon.retrain.rollout import (
    ROLLOUT_DETECTOR,
    active_rollouts,
    confirm_rollout,
    end_rollout,
    get_rollout,
    latest_rollout,
    rollback_rollout,
    save_watch,
    start_rollout,
)
from genmon.retrain.triggers import decide_incident
from genmon.schemas.events import ModelEvent, RetrainStatus, RolloutStatus
from genmon.schemas.retrain import DecisionOutcome, RetrainJobAudit, Rollout
from genmon.schemas.tables import ModelVersionStatus, RetrainJob
from genmon.settings import Settings

BASE = "/models/tiny"
#: What the watcher stores: ``WatchResult.to_json()`` of a regression on one segment.
REGRESSED = {
    "decision": "regressed",
    "elapsed_s": 720.0,
    "planned_watch_s": 2280.0,
    "title": "Challenger v2 raised negative feedback on region=eu",
    "worst": {
        "signal": "negative_feedback",
        "segment": "region=eu",
        "champion_events": 50,
        "champion_n": 500,
        "challenger_events": 16,
        "challenger_n": 100,
        "q_value": 0.003,
        "flagged": True,
    },
}


def served(engine: Engine, model_id: str = "chat", candidates: int = 2) -> list[str]:
    """A registered model with v1 (its base alone) as champion and candidate adapters
    v2.. tuned from it; their names."""
    support.register(engine, model_id)
    create_version(engine, model_id, "v1", BASE, None)
    move_alias(engine, model_id, "champion", "v1")
    return [
        create_version(engine, model_id, None, f"/adapters/{i}", "v1").version
        for i in range(candidates)
    ]


def statuses(engine: Engine, model_id: str = "chat") -> dict[str, ModelVersionStatus]:
    return {row.version: row.status for row in versions(engine, model_id)}


def moves(events: list[ModelEvent]) -> list[tuple[str, str | None, str | None, str]]:
    return [(e.alias.value, e.previous_version, e.version, e.action) for e in events]


def add_job(engine: Engine, job_id: str, status: RetrainStatus, **fields: Any) -> None:
    with session_scope(engine) as session:
        session.add(
            RetrainJob(job_id=job_id, model_id="chat", base_version="v1", status=status, **fields)
        )


# --- starting ---------------------------------------------------------------------------


def test_a_rollout_names_the_challenger_with_its_share_and_one_watches_per_model(
    engine: Engine,
) -> None:
    v2, v3 = served(engine)
    rollout, events = start_rollout(engine, "chat", v2, 0.1, "alice", "try the fix")
    assert moves(events) == [("challenger", None, "v2", "challenger")]
    assert events[0].traffic_share == 0.1 and events[0].artifact_uri == "/adapters/0"
    assert f"challenger on 10% of traffic (rollout {rollout.rollout_id})" in events[0].reason
    assert (rollout.champion, rollout.challenger, rollout.status) == ("v1", "v2", "watching")
    assert aliases(engine, "chat") == {"champion": "v1", "challenger": "v2"}
    assert statuses(engine)["v2"] is ModelVersionStatus.CANDIDATE  # it serves a share only
    assert [r.rollout_id for r in active_rollouts(engine, "chat")] == [rollout.rollout_id]
    # A lost announcement is published again with the share: serving must split the same.
    again = {e.alias.value: e.traffic_share for e in current_events(engine, "chat")}
    assert again == {"champion": None, "challenger": 0.1}

    with pytest.raises(RolloutError, match=f"rollout {rollout.rollout_id} of chat v2 is watch"):
        start_rollout(engine, "chat", v3, 0.1)
    newer, replaced = start_rollout(engine, "chat", v3, 0.2, "job", replace=True)
    assert moves(replaced) == [("challenger", "v2", "v3", "challenger")]
    assert replaced[0].traffic_share == 0.2
    old = get_rollout(engine, rollout.rollout_id)
    assert (old.status, old.reason) == ("cancelled", "replaced by a rollout of v3")
    assert [r.challenger for r in active_rollouts(engine)] == ["v3"]
    assert latest_rollout(engine, "chat") == get_rollout(engine, newer.rollout_id)

    # The index itself: a second watching row cannot be written, whatever the code does.
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(Rollout(model_id="chat", champion="v1", challenger="v2", share=0.1))


def test_what_cannot_start_is_refused_with_what_to_run(engine: Engine) -> None:
    (v2,) = served(engine, candidates=1)
    with pytest.raises(RolloutError, match="is the champion already"):
        start_rollout(engine, "chat", "v1", 0.1)
    with pytest.raises(RolloutError, match="between 0 and 1"):
        start_rollout(engine, "chat", v2, 1.0)
    with pytest.raises(VersionNotFoundError, match="no version 'v9'"):
        start_rollout(engine, "chat", "v9", 0.1)
    with pytest.raises(ModelNotRegisteredError, match="genmon models register other"):
        start_rollout(engine, "other", "v1", 0.1)
    support.register(engine, "bare")
    create_version(engine, "bare", "v1", BASE, None)
    with pytest.raises(RolloutError, match="no champion to compare"):
        start_rollout(engine, "bare", "v1", 0.1)
    assert active_rollouts(engine) == []


def test_a_job_starting_its_rollout_again_gets_the_first_one(engine: Engine) -> None:
    (v2,) = served(engine, candidates=1)
    add_job(engine, "job-2", RetrainStatus.EVALUATING)
    first, events = start_rollout(engine, "chat", v2, 0.1, job_id="job-2", replace=True)
    again, none = start_rollout(engine, "chat", v2, 0.1, job_id="job-2", replace=True)
    assert (again.rollout_id, none, len(events)) == (first.rollout_id, [], 1)


# --- deciding ---------------------------------------------------------------------------


def test_a_clean_watch_confirms_the_challenger_as_champion(engine: Engine) -> None:
    (v2,) = served(engine, candidates=1)
    rollout, _ = start_rollout(engine, "chat", v2, 0.1)
    clean = {**REGRESSED, "decision": "clean", "worst": None}
    save_watch(engine, rollout.rollout_id, {"n": 7}, clean, 1_765_000_000_000, 2280.0)
    stored = get_rollout(engine, rollout.rollout_id)
    assert (stored.state, stored.watch_from_ms, stored.planned_watch_s) == (
        {"n": 7},
        1_765_000_000_000,
        2280.0,
    )

    events = confirm_rollout(engine, rollout.rollout_id, clean, "watcher")
    assert moves(events) == [
        ("champion", "v1", "v2", "confirmed"),
        ("previous", None, "v1", "confirmed"),
        ("challenger", "v2", None, "confirmed"),
    ]
    assert aliases(engine, "chat") == {"champion": "v2", "previous": "v1"}
    assert statuses(engine) == {"v1": "retired", "v2": "active"}
    done = get_rollout(engine, rollout.rollout_id)
    assert (done.status, done.result, done.decided_by) == ("confirmed", clean, "watcher")
    assert done.decided_at is not None and done.reason == "the watch of v2 ended clean"
    with pytest.raises(RolloutError, match="confirmed, not watching: there is nothing to"):
        confirm_rollout(engine, rollout.rollout_id, clean)
    save_watch(engine, rollout.rollout_id, {"n": 8}, {}, None, None)  # decided: kept as is
    assert get_rollout(engine, rollout.rollout_id).state == {"n": 7}

    # A person can still take it back after the confirmation.
    back = rollback(engine, "chat", "bob", "complaints")
    assert moves(back)[0] == ("champion", "v2", "v1", "rolled_back")
    assert statuses(engine) == {"v1": "active", "v2": "rolled_back"}


def test_a_regression_rolls_the_challenger_and_its_job_back_for_good(engine: Engine) -> None:
    served(engine, candidates=0)
    add_job(engine, "job-2", RetrainStatus.PROMOTED)
    v2 = create_version(engine, "chat", None, "/adapters/2", "v1", job_id="job-2").version
    rollout, _ = start_rollout(engine, "chat", v2, 0.1, job_id="job-2")
    said = "Challenger v2 raised negative feedback on region=eu"

    events = rollback_rollout(engine, rollout.rollout_id, REGRESSED, said, "watcher", "f-1")
    assert moves(events) == [("challenger", "v2", None, "rolled_back")]
    assert events[0].reason == said
    assert aliases(engine, "chat") == {"champion": "v1"}
    assert statuses(engine) == {"v1": "active", "v2": "rolled_back"}
    done = get_rollout(engine, rollout.rollout_id)
    assert (done.status, done.incident_finding_id, done.result) == ("rolled_back", "f-1", REGRESSED)
    with Session(engine) as session:
        job = session.get(RetrainJob, "job-2")
        assert job is not None and job.status is RetrainStatus.ROLLED_BACK
        (audit,) = session.exec(select(RetrainJobAudit).where(RetrainJobAudit.job_id == "job-2"))
    assert (audit.to_status, audit.actor, audit.reason) == ("rolled_back", "watcher", said)
    assert rollback_rollout(engine, rollout.rollout_id, REGRESSED, said) == []  # redelivered

    with pytest.raises(RolloutError, match="never rolled out again automatically"):
        start_rollout(engine, "chat", v2, 0.1)
    # A person may still decide it serves.
    assert moves(promote(engine, "chat", v2, "carol"))[0] == ("champion", "v1", "v2", "promoted")


def test_cancelled_and_inconclusive_rollouts_stop_the_challenger_and_keep_it_a_candidate(
    engine: Engine,
) -> None:
    v2, v3 = served(engine)
    first, _ = start_rollout(engine, "chat", v2, 0.1)
    with pytest.raises(RolloutError, match="use confirm_rollout or rollback_rollout"):
        end_rollout(engine, first.rollout_id, RolloutStatus.CONFIRMED, {}, "no")
    events = end_rollout(engine, first.rollout_id, RolloutStatus.INCONCLUSIVE, {}, "a day", "w")
    assert moves(events) == [("challenger", "v2", None, "inconclusive")]
    with pytest.raises(RolloutError, match="inconclusive already"):
        end_rollout(engine, first.rollout_id, RolloutStatus.CANCELLED, {}, "again")
    second, _ = start_rollout(engine, "chat", v3, 0.1)
    assert moves(end_rollout(engine, second.rollout_id, RolloutStatus.CANCELLED, {}, "stop")) == [
        ("challenger", "v3", None, "cancelled")
    ]
    assert statuses(engine) == {"v1": "active", "v2": "candidate", "v3": "candidate"}
    with pytest.raises(RolloutNotFound, match="genmon models rollouts --all"):
        confirm_rollout(engine, "nope", {})


def test_moving_the_aliases_by_hand_ends_the_watch_it_breaks(engine: Engine) -> None:
    v2, v3, v4 = served(engine, candidates=3)
    confirmed, _ = start_rollout(engine, "chat", v2, 0.1)
    promote(engine, "chat", None, "dave")  # the challenger, by hand: a person confirmed it
    done = get_rollout(engine, confirmed.rollout_id)
    assert (done.status, done.decided_by) == ("confirmed", "dave")

    other, _ = start_rollout(engine, "chat", v3, 0.1)
    events = promote(engine, "chat", v4, "erin")  # another champion: the comparison is gone
    assert moves(events)[-1] == ("challenger", "v3", None, "cancelled")
    assert get_rollout(engine, other.rollout_id).status is RolloutStatus.CANCELLED
    assert aliases(engine, "chat") == {"champion": "v4", "previous": "v2"}

    last, _ = start_rollout(engine, "chat", v3, 0.1)
    move_alias(engine, "chat", "challenger", None, "fay")
    assert get_rollout(engine, last.rollout_id).status is RolloutStatus.CANCELLED


# --- the job and the triggers -------------------------------------------------------------


def release(engine: Engine, tmp_path: Path, job_id: str, rollout: dict[str, Any]) -> list[Any]:
    """Run a claimed job's ``record`` after a passing gate; the events it announced."""
    params = {"trainer": "lora", "training": {}, "gate": {}, "rollout": rollout}
    add_job(engine, job_id, RetrainStatus.QUEUED, params=params)
    queue = JobQueue(engine, "w1", 300.0)
    lease = queue.claim()
    assert lease is not None and lease.job_id == job_id
    store = ArtifactStore(str(tmp_path / "artifacts"))
    run = JobRun(Settings(), engine, queue, lease, store, tmp_path)
    announced: list[Any] = []
    run.announce = announced.extend  # the broker is not what this test is about
    job = get_job(engine, job_id)
    plan = Plan.of(job, Settings())
    dataset = BuiltDataset([], [], {}, "d" * 16)
    serving, _ = starting_point(engine, "chat")
    verdict = Verdict("pass", ["completion loss improved"], {})
    assert run.record(job, verdict, f"/adapters/{job_id}", serving, dataset, plan.rollout) == (
        RetrainStatus.PROMOTED
    )
    return announced


def finished_reason(engine: Engine, job_id: str) -> str:
    with Session(engine) as session:
        query = select(RetrainJobAudit).where(RetrainJobAudit.job_id == job_id)
        return list(session.exec(query.order_by(col(RetrainJobAudit.id))))[-1].reason


def test_a_job_that_passes_the_gate_starts_a_canary_or_promotes_directly(
    engine: Engine, tmp_path: Path
) -> None:
    served(engine, candidates=0)
    canary = RolloutPolicy(share=0.2).model_dump(mode="json")
    events = release(engine, tmp_path, "job-a", canary)
    (rollout,) = active_rollouts(engine, "chat")
    assert (rollout.challenger, rollout.share, rollout.job_id) == ("v2", 0.2, "job-a")
    assert moves(events) == [("challenger", None, "v2", "challenger")]
    assert events[0].traffic_share == 0.2
    assert finished_reason(engine, "job-a").startswith(
        f"challenger on 20% of traffic (rollout {rollout.rollout_id}); gate: pass"
    )
    assert get_job(engine, "job-a").status is RetrainStatus.PROMOTED
    # A retrain while the challenger is watched starts from the champion, not from it.
    assert starting_point(engine, "chat") == ("v1", None)

    release(engine, tmp_path, "job-b", canary)  # a newer challenger replaces the watch
    assert [r.challenger for r in active_rollouts(engine, "chat")] == ["v3"]
    assert get_rollout(engine, rollout.rollout_id).status is RolloutStatus.CANCELLED

    direct = RolloutPolicy(mode="direct").model_dump(mode="json")
    events = release(engine, tmp_path, "job-c", direct)
    assert moves(events)[:2] == [
        ("champion", "v1", "v4", "promoted"),
        ("previous", None, "v1", "promoted"),
    ]
    assert active_rollouts(engine, "chat") == []  # the direct champion ended v3's watch
    assert finished_reason(engine, "job-c").startswith("champion (rollout.mode direct)")
    assert starting_point(engine, "chat") == ("v4", "/adapters/job-c")
    rollback(engine, "chat")  # v4 rolled back: the next job starts from v1 again
    assert starting_point(engine, "chat") == ("v1", None)


def test_a_queued_job_keeps_the_rollout_policy_and_an_older_one_reads_the_current(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "rollout": {"mode": "direct"}}))
    settings = Settings.model_validate({"retrain": {"policy_file": str(path)}})
    kept = {"trainer": "lora", "training": {"seed": 3}, "gate": {}}
    job = RetrainJob(job_id="j", model_id="chat", base_version="v1", params=kept)
    older = Plan.of(job, settings)
    assert (older.rollout.mode, older.params["seed"]) == ("direct", 3)  # training kept
    job.params = {**kept, "rollout": RolloutPolicy(share=0.3).model_dump(mode="json")}
    assert (Plan.of(job, settings).rollout.mode, Plan.of(job, settings).rollout.share) == (
        "canary",
        0.3,
    )


def test_incidents_of_the_rollout_watch_are_never_retrained_on(engine: Engine) -> None:
    support.register(engine, "bot")
    policy = support.policy(incidents=[{"match": {"signal": "negative_feedback"}}])
    incident_id = support.incident(engine, "bot", signal="negative_feedback")
    watched = support.incident(engine, "bot", signal="negative_feedback", detector=ROLLOUT_DETECTOR)
    assert decide_incident(engine, policy, watched) is None
    (decision,) = support.decisions(engine, "bot")
    assert decision.outcome is DecisionOutcome.IGNORED and decision.incident_id == watched
    assert "rolls the challenger back; it is not retrained on" in decision.reason
    assert decision.details["final"] is True
    assert decide_incident(engine, policy, incident_id) is not None  # the same, not watched


# --- the policy ---------------------------------------------------------------------------


def test_the_rollout_section_defaults_merges_per_model_and_names_its_problems() -> None:
    policy = parse_policy(
        yaml.safe_dump(
            {
                "rollout": {"share": 0.2, "min_regression": {"negative_feedback": 0.03}},
                "models": [
                    {"match": "bank-*", "rollout": {"mode": "direct"}},
                    {"match": "bank-bot", "rollout": {"min_regression": {"error_rate": 0.01}}},
                ],
            }
        ),
        "p.yaml",
    )
    other, bank = policy.for_model("chat").rollout, policy.for_model("bank-bot").rollout
    assert (other.mode, other.share, other.on_regression) == ("canary", 0.2, "rollback")
    assert other.min_regression == {
        "negative_feedback": 0.03,
        "refusal_rate": 0.03,
        "error_rate": 0.02,
        "slow_rate": 0.05,
    }
    assert (bank.mode, bank.share) == ("direct", 0.2)
    assert bank.min_regression["error_rate"] == 0.01
    assert bank.min_regression["negative_feedback"] == 0.03
    bad = {"rollout": {"share": 1.5, "min_regression": {"negativ_feedback": 0.1}, "mode": "x"}}
    with pytest.raises(Exception) as caught:
        parse_policy(yaml.safe_dump(bad), "bad.yaml")
    text = str(caught.value)
    assert "rollout.share: 1.5: input should be less than 1" in text
    assert "rollout.min_regression.negativ_feedback: 'negativ_feedback'" in text
    assert "rollout.mode: 'x': input should be 'canary' or 'direct'" in text


# --- the commands -----------------------------------------------------------------------


def test_models_commands_roll_out_list_show_and_roll_back(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    engine = migrated_engine(url)
    v2, v3 = served(engine)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(models, [*args, "--url", url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = run("rollout", "chat", v2, "--no-announce", "--actor", "al")  # the policy's share
    assert "chat v2 on 10% of traffic, watched against v1" in out
    assert "challenger: - -> v2 (challenger, 10% of traffic)" in out
    (rollout,) = active_rollouts(engine, "chat")
    assert rollout.started_by == "al"
    refused = runner.invoke(models, ["rollout", "chat", v3, "--url", url, "--no-announce"])
    assert isinstance(refused.exception, RolloutError) and "--replace" in str(refused.exception)

    assert "no traffic yet" in run("rollouts")
    save_watch(engine, rollout.rollout_id, {}, REGRESSED, 0, 2280.0)
    listed = run("rollouts", "chat")
    assert "12 min of 38 min" in listed
    assert "negative_feedback on region=eu: 16.0% vs 10.0% (q=0.003) REGRESSED" in listed
    (shown,) = json.loads(run("rollouts", "--json"))
    assert (shown["rollout_id"], shown["share"]) == (rollout.rollout_id, 0.1)
    described = json.loads(run("show", "chat", "--json"))
    assert described["rollout"]["challenger"] == "v2"
    assert f"rollout {rollout.rollout_id}: v2 on 10% of traffic against v1" in run("show", "chat")

    out = run("rollback", "chat", "--no-announce", "--reason", "bad answers")
    assert "challenger v2 rolled back; v1 keeps serving" in out
    assert "challenger: v2 -> - (rolled_back)" in out
    assert get_rollout(engine, rollout.rollout_id).status is RolloutStatus.ROLLED_BACK
    assert "no rollouts watching" in run("rollouts")
    assert "rolled_back" in run("rollouts", "--all")

    moved = json.loads(run("rollout", "chat", v3, "--share", "0.25", "--json", "--no-announce"))
    assert moved["rollout"]["share"] == 0.25
    assert [e["traffic_share"] for e in moved["events"]] == [0.25]
    engine.dispose()
