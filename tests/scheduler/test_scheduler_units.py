"""The scheduler's parts: cron listing, misfire grace, the lease, the once-per-tick claim,
the digest and the CLI."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import scheduler_support as support
from click.testing import CliRunner
from incident_support import migrated_engine, postgres_schema_url
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.cli import main
from genmon.exceptions import ConfigurationError
from genmon.privacy.retention import run_retention
from genmon.retrain.policy import parse_policy
from genmon.scheduler.digest import build_digest, digest_destination, send_digest
from genmon.scheduler.effects import schedule_key
from genmon.scheduler.lease import LeaderLease, current_lease
from genmon.scheduler.listing import describe
from genmon.scheduler.schedules import build_schedules, due_tick
from genmon.scheduler.service import Scheduler, fire
from genmon.schemas.events import (
    FindingKind,
    IncidentStatus,
    RetrainStatus,
    Severity,
    TriggerKind,
    job_id_for,
    new_id,
)
from genmon.schemas.incidents import (
    DeliveryAttempt,
    Incident,
    Notification,
    NotificationEvent,
    NotificationStatus,
)
from genmon.schemas.retrain import DecisionOutcome, RetrainDecision
from genmon.schemas.tables import LabelledExample, RetrainJob
from genmon.settings import SchedulerSettings, Settings, get_settings

T0 = support.T0


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    with postgres_schema_url(postgres_url) as url:
        engine = migrated_engine(url)
        yield engine
        engine.dispose()


def _policy(*crons: str) -> str:
    entries = "".join(f"\n    - {{cron: '{c}', name: n{i}}}" for i, c in enumerate(crons))
    return (
        f"triggers:\n  schedule:{entries}\nguards: {{cooldown_s: 0, min_examples_per_class: 0}}\n"
    )


def test_cron_next_runs_are_listed_in_the_configured_time_zone() -> None:
    config = SchedulerSettings(
        timezone="Europe/Berlin", retention_cron="17 3 * * *", digest_destination=None
    )
    policy = parse_policy(_policy("0 */6 * * *"), "p.yaml")
    schedules = {s.name: s for s in build_schedules(config, policy, ["chat"])}
    # No digest without a destination; the retrain schedule is named by model and trigger.
    assert sorted(schedules) == ["retention", "retrain:chat:n0"]
    now = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)  # 13:00 in Berlin (winter, UTC+1)
    assert schedules["retention"].next_after(now) == datetime(2026, 1, 11, 2, 17, tzinfo=UTC)
    assert schedules["retrain:chat:n0"].next_after(now) == datetime(2026, 1, 10, 17, tzinfo=UTC)
    with pytest.raises(ConfigurationError, match="not a cron expression"):
        build_schedules(config, parse_policy(_policy("61 * * * *"), "p.yaml"), ["chat"])
    with pytest.raises(ConfigurationError, match="not a known time zone"):
        build_schedules(SchedulerSettings(timezone="Mars/Base"), policy, [])


def test_the_misfire_grace_keeps_the_latest_tick_and_nothing_older() -> None:
    policy = parse_policy(_policy("0 * * * *"), "p.yaml")
    [hourly] = build_schedules(
        SchedulerSettings(retention_cron=None, digest_cron=None), policy, ["m"]
    )
    ten = datetime(2026, 1, 1, 10, tzinfo=UTC)
    # Exactly the grace old: out (the window is (now - grace, now]); a second less: in.
    assert due_tick(hourly, ten + timedelta(seconds=600), 600) is None
    assert due_tick(hourly, ten + timedelta(seconds=599), 600) == ten
    assert due_tick(hourly, ten, 0) == ten  # a zero grace fires only on time
    assert due_tick(hourly, ten + timedelta(seconds=1), 0) is None
    # Three missed ticks coalesce into the latest; one already handled is not due again.
    assert due_tick(hourly, ten + timedelta(minutes=5), 4 * 3600) == ten
    assert due_tick(hourly, ten + timedelta(minutes=5), 4 * 3600, handled=ten) is None
    assert due_tick(hourly, ten + timedelta(hours=1), 4 * 3600, handled=ten) == ten + timedelta(
        hours=1
    )


def test_two_leaders_enqueue_a_tick_once(pg_engine: Engine, tmp_path: Path) -> None:
    """Two leaders (one resumed after a pause) fire the same tick at the same moment."""
    support.register(pg_engine, "bot")
    policy_file = support.write_policy(tmp_path / "p.yaml", [{"cron": "0 3 * * *"}])
    settings = support.settings_for("unused", policy_file)
    policy = support.policy_of(policy_file)
    [nightly] = build_schedules(settings.scheduler, policy, ["bot"])
    tick = datetime(2026, 1, 2, 3, tzinfo=UTC)
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def leader(holder: str, epoch: int) -> None:
        start.wait()
        results[holder] = fire(
            pg_engine, settings, policy, nightly, tick, holder=holder, epoch=epoch
        )

    threads = [threading.Thread(target=leader, args=(f"p{i}", i)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results.values() if r is not None]
    assert len(done) == 1 and list(results.values()).count(None) == 1
    key = schedule_key("bot", "schedule[0]", tick)
    [job] = support.jobs(pg_engine, "bot")
    assert (job.job_id, job.trigger, job.trigger_key) == (job_id_for(key), "schedule", key)
    assert job.status is RetrainStatus.QUEUED
    [row] = support.fire_rows(pg_engine)
    assert (row.schedule, row.fire_time, row.result["outcome"]) == (
        "retrain:bot:schedule[0]",
        tick,
        "enqueued",
    )
    with Session(pg_engine) as session:
        decision = session.exec(select(RetrainDecision)).one()
    assert (decision.trigger, decision.outcome) == (
        TriggerKind.SCHEDULE.value,
        DecisionOutcome.ENQUEUED,
    )


def test_a_scheduled_retrain_goes_through_the_guards(pg_engine: Engine, tmp_path: Path) -> None:
    support.register(pg_engine, "bot")
    policy_file = support.write_policy(
        tmp_path / "p.yaml", [{"cron": "0 3 * * *", "name": "nightly"}], min_examples_per_class=5
    )
    settings = support.settings_for("unused", policy_file)
    policy = support.policy_of(policy_file)
    [nightly] = build_schedules(settings.scheduler, policy, ["bot"])
    result = fire(pg_engine, settings, policy, nightly, T0, holder="p", epoch=1)
    assert result is not None and result["outcome"] == "refused"
    assert "too few examples" in result["reason"]
    assert support.jobs(pg_engine, "bot") == []


def test_the_lease_changes_hands_only_when_it_lapses(pg_engine: Engine, tmp_path: Path) -> None:
    policy_file = support.write_policy(tmp_path / "p.yaml", [])
    settings = support.settings_for("unused", policy_file, lease_s=0.5)
    policy = support.policy_of(policy_file)
    first = Scheduler(settings, pg_engine, policy, holder="first")
    second = Scheduler(settings, pg_engine, policy, holder="second")
    try:
        assert first.poll_once() == first.lease.current()
        assert first.leading and first.state is not None and first.state.epoch == 1
        standby = second.poll_once()
        assert standby is not None and (standby.leader, standby.holder) == (False, "first")
        assert second._aps is None  # a standby does not start APScheduler
        _until(lambda: current_lease(pg_engine).holder is None, "the first lease to lapse")
        taken = second.poll_once()
        assert taken is not None and (taken.holder, taken.epoch, taken.leader) == (
            "second",
            2,
            True,
        )
        # The first leader's renewal fails: it stops scheduling at once.
        lost = first.poll_once()
        assert lost is not None and not lost.leader and first._aps is None and not first.leading
        assert first.tick() == []
        # A graceful stop hands the lease over without waiting for it to lapse.
        second.stop()
        assert current_lease(pg_engine).holder is None
        assert LeaderLease(pg_engine, "third", 5).hold().epoch == 3
    finally:
        first.stop()
        second.stop()


def _until(condition: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _incident(engine: Engine, model_id: str, signal: str, opened: datetime, resolved: bool) -> None:
    with Session(engine) as session:
        session.add(
            Incident(
                id=new_id(),
                fingerprint=new_id(),
                model_id=model_id,
                detector="rate_cusum",
                kind=FindingKind.QUALITY,
                signal=signal,
                severity=Severity.WARNING,
                title=f"{signal} up",
                opened_at=opened,
                status=IncidentStatus.RESOLVED if resolved else IncidentStatus.OPEN,
                resolved_at=opened + timedelta(hours=1) if resolved else None,
            )
        )
        session.commit()


def test_the_digest_sums_up_the_day_for_a_webhook_or_slack_only(
    pg_engine: Engine, tmp_path: Path
) -> None:
    since, until = T0 - timedelta(days=1), T0
    for signal in ("refusal_rate", "refusal_rate", "error_rate"):
        _incident(pg_engine, "bot", signal, since + timedelta(hours=2), resolved=False)
    _incident(pg_engine, "bot", "error_rate", since + timedelta(hours=3), resolved=True)
    _incident(pg_engine, "old", "error_rate", since - timedelta(hours=3), resolved=False)
    with Session(pg_engine) as session:
        session.add(
            RetrainJob(
                model_id="bot", base_version="v1", status=RetrainStatus.PROMOTED, finished_at=until
            )
        )
        session.commit()
    digest = build_digest(pg_engine, since, until)
    assert digest["models"] == {
        "bot": {
            "incidents_opened": 4,
            "incidents_resolved": 1,
            "retrain": {"promoted": 1},
            "top_signals": [
                {"signal": "error_rate", "incidents": 2},
                {"signal": "refusal_rate", "incidents": 2},
            ],
        }
    }
    hooks = [
        {"name": "hook", "type": "webhook", "url": "http://127.0.0.1:9/hook"},
        {"name": "pd", "type": "pagerduty", "url": "http://127.0.0.1:9/pd", "routing_key": "k"},
    ]

    def settings(name: str) -> Settings:
        return Settings(notify={"destinations": hooks}, scheduler={"digest_destination": name})

    assert digest_destination(settings("hook")).name == "hook"
    with pytest.raises(ConfigurationError, match="pagerduty destination; a digest goes to webhook"):
        digest_destination(settings("pd"))
    with pytest.raises(ConfigurationError, match="is no destination of notify"):
        digest_destination(settings("nowhere"))
    first = send_digest(pg_engine, settings("hook"), since, until)
    again = send_digest(pg_engine, settings("hook"), since, until)
    assert (first["queued"], again["queued"]) == (True, False)
    with Session(pg_engine) as session:
        [row] = session.exec(select(Notification)).all()
    assert (row.incident_id, row.event, row.destination) == (None, NotificationEvent.DIGEST, "hook")
    assert row.idempotency_key == f"digest:hook:{until.isoformat()}"
    assert row.payload["digest"]["models"]["bot"]["incidents_opened"] == 4


def test_schedule_list_and_fire_by_hand(
    pg_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support.register(pg_engine, "bot")
    policy_file = support.write_policy(tmp_path / "p.yaml", [{"cron": "0 3 * * *", "name": "n"}])
    monkeypatch.setenv("GENMON_RETRAIN__POLICY_FILE", str(policy_file))
    monkeypatch.setenv("GENMON_SCHEDULER__RETENTION_CRON", "")
    get_settings.cache_clear()
    url = pg_engine.url.render_as_string(hide_password=False)
    try:
        runner = CliRunner()
        fired = runner.invoke(
            main, ["schedule", "fire", "retrain:bot:n", "--by", "ann", "--url", url]
        )
        assert fired.exit_code == 0, fired.output
        listed = runner.invoke(main, ["schedule", "list", "--url", url])
        assert listed.exit_code == 0, listed.output
        unknown = runner.invoke(main, ["schedule", "fire", "nope", "--url", url])
        assert unknown.exit_code != 0 and "no schedule named 'nope'" in unknown.output
    finally:
        get_settings.cache_clear()
    [row] = support.fire_rows(pg_engine)
    assert row.holder == "manual:ann" and row.result["outcome"] == "enqueued"
    assert len(support.jobs(pg_engine, "bot")) == 1
    assert "retrain:bot:n" in listed.output and "enqueued" in listed.output
    out = describe(get_settings(), pg_engine, support.policy_of(policy_file), T0)
    assert [s["name"] for s in out["schedules"]] == ["retrain:bot:n"]  # retention unset


def test_the_retention_schedule_runs_retention(pg_engine: Engine, tmp_path: Path) -> None:
    policy_file = support.write_policy(tmp_path / "p.yaml", [])
    settings = support.settings_for("unused", policy_file, retention_cron="17 3 * * *").model_copy(
        update={
            "retrain": Settings().retrain.model_copy(
                update={"artifacts_uri": str(tmp_path / "artifacts"), "policy_file": policy_file}
            )
        }
    )
    with Session(pg_engine) as session:
        for age_days in (400, 1):
            session.add(
                LabelledExample(
                    request_id=new_id(),
                    model_id="bot",
                    model_version="v1",
                    prompt="p",
                    response="r",
                    created_at=T0 - timedelta(days=age_days),
                )
            )
        session.commit()
    [retention] = build_schedules(settings.scheduler, support.policy_of(policy_file), [])
    result = fire(
        pg_engine,
        settings,
        support.policy_of(policy_file),
        retention,
        T0,
        holder="p",
        epoch=1,
        clock=lambda: T0,
    )
    assert result is not None and result["status"] == "done", result
    with Session(pg_engine) as session:
        left = session.exec(select(LabelledExample.created_at)).all()
    assert left == [T0 - timedelta(days=1)]


def test_retention_removes_settled_digests_older_than_notifications_days(
    pg_engine: Engine,
) -> None:
    """A digest has no incident to be resolved: it goes once settled and old enough."""
    now = T0
    with Session(pg_engine) as session:
        for key, status, age_days in (
            ("old-delivered", NotificationStatus.DELIVERED, 40),
            ("old-dead", NotificationStatus.DEAD, 40),
            ("old-pending", NotificationStatus.PENDING, 40),
            ("new-delivered", NotificationStatus.DELIVERED, 1),
        ):
            at = now - timedelta(days=age_days)
            row = Notification(
                incident_id=None,
                destination="hook",
                event=NotificationEvent.DIGEST,
                idempotency_key=key,
                status=status,
                created_at=at,
                delivered_at=at if status is NotificationStatus.DELIVERED else None,
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            session.add(DeliveryAttempt(notification_id=row.id, attempt=1, outcome="x", at=at))
        session.commit()
    keep = {k: None for k in Settings().retention.model_dump() if k.endswith("_days")}
    settings = Settings(retention={**keep, "notifications_days": 30})
    report = run_retention(pg_engine, settings, now=now)
    assert report.kinds["notifications"].removed == 2
    with Session(pg_engine) as session:
        left = sorted(row.idempotency_key for row in session.exec(select(Notification)))
        attempts = len(session.exec(select(DeliveryAttempt)).all())
    assert left == ["new-delivered", "old-pending"] and attempts == 2
