"""``genmon schedule``: the one scheduler across processes (:mod:`genmon.scheduler`).

The scheduler room is imported inside the commands so ``genmon --help`` stays instant.
"""

from __future__ import annotations

from typing import Any

import click

from genmon.cli._common import (
    current_user,
    database_option,
    echo_json,
    echo_table,
    engine_for,
    json_option,
    when,
)
from genmon.cli._progress import spinner
from genmon.settings import get_settings


@click.group()
def schedule() -> None:
    """See the schedules and who leads; fire one by hand; run the scheduler alone."""


@schedule.command("list")
@json_option()
@database_option
def schedule_list(as_json: bool, url: str | None) -> None:
    """Every schedule: its cron, next run, last fire, and who leads now."""
    from genmon.retrain.policy import load_policy
    from genmon.scheduler.listing import describe
    from genmon.schemas.events import utcnow

    settings = get_settings()
    engine = engine_for(url)
    try:
        out = describe(settings, engine, load_policy(settings.retrain.policy_file), utcnow())
    finally:
        engine.dispose()
    if as_json:
        echo_json(out)
        return
    leader = out["leader"]
    if leader["holder"]:
        click.echo(
            f"leader: {leader['holder']} (epoch {leader['epoch']}, until {when(leader['until'])})"
        )
    else:
        click.echo("leader: none (no scheduler runs, or its lease lapsed)")
    if not out["enabled"]:
        click.echo("scheduler.enabled is false: retrain workers do not run it", err=True)
    rows = [
        [
            s["name"],
            f"{s['cron']} ({s['timezone']})",
            when(s["next_run"]),
            when(s["last_fire"]),
            _status(s["last_result"]),
        ]
        for s in out["schedules"]
    ]
    if not rows:
        click.echo("no schedules")
        return
    echo_table(rows, ["SCHEDULE", "CRON", "NEXT RUN (UTC)", "LAST FIRE (UTC)", "LAST RESULT"])


def _status(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    return str(result.get("outcome") or result.get("status") or "-")


@schedule.command("fire")
@click.argument("name")
@click.option("--by", "actor", default=None, help="Who fires it; default: your user name.")
@json_option()
@database_option
def schedule_fire(name: str, actor: str | None, as_json: bool, url: str | None) -> None:
    """Enqueue one tick of schedule NAME now (recorded as fired by hand)."""
    from genmon.retrain.policy import load_policy
    from genmon.scheduler.listing import fire_by_hand
    from genmon.schemas.events import utcnow

    settings = get_settings()
    engine = engine_for(url)
    try:
        policy = load_policy(settings.retrain.policy_file)
        with spinner(f"firing {name}", as_json=as_json):
            out = fire_by_hand(settings, engine, policy, name, actor or current_user(), utcnow())
    finally:
        engine.dispose()
    if as_json:
        echo_json(out)
        return
    if not out["fired"]:
        click.echo(f"{name} at {when(out['fire_time'])} was fired already", err=True)
        return
    click.echo(f"{name} at {when(out['fire_time'])}: {out['result']}")


@schedule.command("run")
@click.option(
    "--loglevel",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Default settings.worker.loglevel (GENMON_WORKER__LOGLEVEL).",
)
def schedule_run(loglevel: str | None) -> None:
    """Run the scheduler alone until Ctrl-C or SIGTERM (a standby until it leads)."""
    from genmon.scheduler.service import run_scheduler

    run_scheduler(get_settings(), loglevel=loglevel)
