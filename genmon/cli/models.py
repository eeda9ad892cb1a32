"""``genmon models``: register retrainable models, inspect versions, move aliases, roll
versions out, follow.

Every alias move (register, promote, rollout, rollback) is one database transaction, then
is announced on ``<prefix>.models`` and to the webhook destinations. The registry, the
announcer and torch are imported inside the commands so ``genmon --help`` stays instant.
"""

from __future__ import annotations

import json
import queue
from typing import TYPE_CHECKING, Any

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
from genmon.settings import get_settings

if TYPE_CHECKING:
    from genmon.schemas.events import ModelEvent
    from genmon.schemas.retrain import Rollout

_ALIASES = ("champion", "challenger", "previous")


@click.group()
def models() -> None:
    """Register models, inspect their versions, move aliases, follow what serves."""


def _actor_option(function: Any) -> Any:
    return click.option("--actor", default=None, help="Who does it (default: your user).")(function)


def _no_announce_option(function: Any) -> Any:
    return click.option(
        "--no-announce",
        is_flag=True,
        help="Change the database only; publish later with `genmon models announce`.",
    )(function)


def _announce(
    model_id: str, events: list[ModelEvent], skip: bool, as_json: bool, *, show: bool = True
) -> None:
    """Print the moves (unless not ``show``), then publish them (topic and webhooks)
    unless ``skip``."""
    if as_json and show:
        echo_json([event.model_dump(mode="json") for event in events])
    elif not events and show:
        click.echo("nothing changed")
    for event in events if show and not as_json else []:
        share = f", {_share(event.traffic_share)} of traffic" if event.traffic_share else ""
        click.echo(
            f"{event.model_id} {event.alias.value}: {event.previous_version or '-'} -> "
            f"{event.version or '-'} ({event.action}{share})"
        )
    if skip or not events:
        return
    from genmon.retrain.announce import ModelAnnouncer
    from genmon.retrain.registry import RegistryError

    with ModelAnnouncer(get_settings()) as announcer:
        report = announcer.announce(events)
    if not report.ok:
        raise RegistryError(
            "the aliases moved, but announcing the move failed: "
            + "; ".join(report.failures)
            + f". Run `genmon models announce {model_id}` once the broker or endpoint is back."
        )
    if not as_json:
        hooks = ", ".join(f"{name} ({n})" for name, n in report.delivered.items()) or "none"
        click.echo(f"announced on {announcer.topic}; webhooks: {hooks}")


@models.command("register")
@click.argument("model_id")
@click.option("--base", "base_uri", required=True, help="Base weights: a folder or a cached HF id.")
@click.option("--serving-version", required=True, help="The version name serving now, e.g. v1.")
@click.option("--force", is_flag=True, help="Re-register on different weights.")
@_actor_option
@_no_announce_option
@json_option()
@database_option
def models_register(
    model_id: str,
    base_uri: str,
    serving_version: str,
    force: bool,
    actor: str | None,
    no_announce: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Make MODEL retrainable: its base weights (fingerprinted) and serving version."""
    from genmon.retrain.registry import register_model

    found: list[ModelEvent] = []
    model = register_model(
        engine_for(url),
        model_id,
        base_uri,
        serving_version,
        actor or current_user(),
        force=force,
        announce=found.extend,
    )
    if not as_json:
        click.echo(
            f"{model.model_id} registered on {model.base_uri} "
            f"(fingerprint {model.base_fingerprint[:12]}), serving {model.serving_version}"
        )
    _announce(model_id, found, no_announce, as_json)


@models.command("list")
@json_option()
@database_option
def models_list(as_json: bool, url: str | None) -> None:
    """Registered models with their aliases."""
    from genmon.retrain.registry import aliases, list_models, versions

    engine = engine_for(url)
    found = [
        (m, aliases(engine, m.model_id), len(versions(engine, m.model_id)))
        for m in list_models(engine)
    ]
    if as_json:
        echo_json([{**m.model_dump(mode="json"), "aliases": a, "versions": n} for m, a, n in found])
        return
    if not found:
        click.echo("no registered models; `genmon models register MODEL --base PATH ...`")
        return
    rows = [
        [
            m.model_id,
            *(a.get(alias, "-") for alias in _ALIASES),
            str(n),
            m.base_fingerprint[:12],
            m.base_uri,
        ]
        for m, a, n in found
    ]
    echo_table(
        rows, ["MODEL", "CHAMPION", "CHALLENGER", "PREVIOUS", "VERSIONS", "BASE SHA", "BASE"]
    )


@models.command("show")
@click.argument("model_id")
@json_option()
@database_option
def models_show(model_id: str, as_json: bool, url: str | None) -> None:
    """One model: its base, aliases, its watching rollout, and every version with lineage
    and metrics."""
    from genmon.retrain.registry import aliases, get_model, versions
    from genmon.retrain.rollout import active_rollouts
    from genmon.schemas.tables import ModelVersionPublic

    engine = engine_for(url)
    model = get_model(engine, model_id)
    pointers = aliases(engine, model_id)
    rows = versions(engine, model_id)
    watching = active_rollouts(engine, model_id)
    if as_json:
        echo_json(
            {
                "model": model.model_dump(mode="json"),
                "aliases": pointers,
                "rollout": watching[0].model_dump(mode="json") if watching else None,
                "versions": [
                    ModelVersionPublic.model_validate(r).model_dump(mode="json") for r in rows
                ],
            }
        )
        return
    by_version: dict[str, list[str]] = {}
    for alias, version in pointers.items():
        by_version.setdefault(version, []).append(alias)
    click.echo(f"{model.model_id}: serving {model.serving_version}")
    click.echo(f"  base {model.base_uri} (fingerprint {model.base_fingerprint[:16]})")
    click.echo(f"  registered {when(model.created_at)} by {model.registered_by}")
    for rollout in watching:
        click.echo(f"  {_rollout_line(rollout)}")
    table = [
        [
            r.version,
            r.status.value,
            ",".join(sorted(by_version.get(r.version, []))) or "-",
            r.parent_version or "-",
            (r.job_id or "-")[:12],
            (r.dataset_hash or "-")[:12],
            ",".join(r.incident_ids) or "-",
            when(r.promoted_at),
            r.artifact_uri if r.artifact_uri != r.base_uri else "(base)",
        ]
        for r in rows
    ]
    header = ["VERSION", "STATUS", "ALIASES", "PARENT", "JOB", "DATASET", "INCIDENTS", "PROMOTED"]
    echo_table(table, [*header, "ARTIFACT"])
    for r in rows:
        if r.eval_metrics:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in sorted(r.eval_metrics.items()))
            click.echo(f"  {r.version} metrics: {shown}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


@models.command("card")
@click.argument("model_id")
@click.argument("version")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Write the card to FILE.")
@json_option("Print the card's content as JSON instead of Markdown.")
@database_option
def models_card(
    model_id: str, version: str, out: str | None, as_json: bool, url: str | None
) -> None:
    """The model card of MODEL VERSION (Markdown): base and adapter, data, metrics overall
    and per segment, the gate's verdict, incidents and rollouts."""
    from pathlib import Path

    from genmon.retrain.artifacts import ArtifactStore
    from genmon.retrain.card import card_facts, render_card

    store = ArtifactStore(get_settings().retrain.artifacts_uri)
    facts = card_facts(engine_for(url), store, model_id, version)
    text = json.dumps(facts, indent=2, sort_keys=True) + "\n" if as_json else render_card(facts)
    if out is None:
        click.echo(text, nl=False)
        return
    Path(out).write_text(text, encoding="utf-8")
    click.echo(f"wrote the card of {model_id} {version} to {out}")


@models.command("promote")
@click.argument("model_id")
@click.argument("version", required=False)
@click.option("--reason", default="", help="Why, for the announcement.")
@_actor_option
@_no_announce_option
@json_option()
@database_option
def models_promote(
    model_id: str,
    version: str | None,
    reason: str,
    actor: str | None,
    no_announce: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Make VERSION (default: the challenger) the champion; the old one becomes previous."""
    from genmon.retrain.registry import promote

    events = promote(engine_for(url), model_id, version, actor or current_user(), reason)
    _announce(model_id, events, no_announce, as_json)


@models.command("rollback")
@click.argument("model_id")
@click.option("--reason", default="", help="Why, for the announcement.")
@_actor_option
@_no_announce_option
@json_option()
@database_option
def models_rollback(
    model_id: str,
    reason: str,
    actor: str | None,
    no_announce: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Stop a bad version now; the version stopped is marked rolled_back.

    While a rollout is watching, its challenger is rolled back (the champion keeps
    serving). Otherwise the champion goes back to the previous version, also after a
    rollout was confirmed."""
    from genmon.retrain.registry import rollback
    from genmon.retrain.rollout import active_rollouts, rollback_rollout

    engine, who = engine_for(url), actor or current_user()
    watching = active_rollouts(engine, model_id)
    if not watching:
        events = rollback(engine, model_id, who, reason)
        _announce(model_id, events, no_announce, as_json)
        return
    rollout = watching[0]
    said = reason or f"rolled back by hand by {who}"
    events = rollback_rollout(engine, rollout.rollout_id, rollout.result, said, who)
    if not as_json:
        click.echo(
            f"rollout {rollout.rollout_id}: challenger {rollout.challenger} rolled back; "
            f"{rollout.champion} keeps serving all traffic"
        )
    _announce(model_id, events, no_announce, as_json)


@models.command("rollout")
@click.argument("model_id")
@click.argument("version")
@click.option(
    "--share",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=None,
    help="The challenger's share of traffic (default: the retrain policy's rollout.share).",
)
@click.option("--reason", default="", help="Why, for the announcement.")
@click.option("--replace", is_flag=True, help="Cancel a watching rollout and start this one.")
@_actor_option
@_no_announce_option
@json_option()
@database_option
def models_rollout(
    model_id: str,
    version: str,
    share: float | None,
    reason: str,
    replace: bool,
    actor: str | None,
    no_announce: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Put VERSION on a share of MODEL's traffic as the challenger, watched against the
    champion: confirmed when the watch ends clean, rolled back when it regresses."""
    from genmon.detectors.rollout import watch_minutes_text
    from genmon.retrain.policy import load_policy
    from genmon.retrain.rollout import start_rollout

    if share is None:
        policy = load_policy(get_settings().retrain.policy_file)
        share = policy.for_model(model_id).rollout.share
    engine, who = engine_for(url), actor or current_user()
    rollout, events = start_rollout(engine, model_id, version, share, who, reason, replace=replace)
    if as_json:
        echo_json(
            {
                "rollout": rollout.model_dump(mode="json"),
                "events": [event.model_dump(mode="json") for event in events],
            }
        )
    else:
        click.echo(
            f"rollout {rollout.rollout_id}: {model_id} {version} on {_share(rollout.share)}"
            f" of traffic, watched against {rollout.champion}; "
            f"{watch_minutes_text(rollout.planned_watch_s)} (`genmon models rollouts {model_id}`)"
        )
    _announce(model_id, events, no_announce, as_json, show=not as_json)


@models.command("rollouts")
@click.argument("model_id", required=False)
@click.option("--all", "show_all", is_flag=True, help="Decided rollouts too (the latest 20).")
@json_option()
@database_option
def models_rollouts(model_id: str | None, show_all: bool, as_json: bool, url: str | None) -> None:
    """Rollouts being watched (of MODEL, or of every model): share, how long watched of
    the planned watch, and the comparison closest to a rollback."""
    from genmon.retrain.rollout import active_rollouts, list_rollouts

    engine = engine_for(url)
    found = list_rollouts(engine, model_id) if show_all else active_rollouts(engine, model_id)
    if as_json:
        echo_json([rollout.model_dump(mode="json") for rollout in found])
        return
    if not found:
        which = "rollouts" if show_all else "rollouts watching"
        click.echo(f"no {which}; `genmon models rollout MODEL VERSION` starts one")
        return
    rows = [
        [
            r.rollout_id[:12],
            r.model_id,
            f"{r.challenger} vs {r.champion}",
            _share(r.share),
            r.status.value,
            _watched(r),
            _worst(r.result),
            when(r.started_at),
        ]
        for r in found
    ]
    header = ["ROLLOUT", "MODEL", "CHALLENGER", "SHARE", "STATUS", "WATCHED", "WORST"]
    echo_table(rows, [*header, "STARTED"])


def _rollout_line(rollout: Rollout) -> str:
    """One rollout in a sentence, for ``genmon models show``."""
    return (
        f"rollout {rollout.rollout_id}: {rollout.challenger} on {_share(rollout.share)} of "
        f"traffic against {rollout.champion}, {rollout.status.value} since "
        f"{when(rollout.started_at)}; watched {_watched(rollout)}; worst: {_worst(rollout.result)}"
    )


def _share(share: float) -> str:
    from genmon.retrain.rollout import share_text

    return share_text(share)


def _watched(rollout: Rollout) -> str:
    """``"12 min of 38 min"``: event time watched so far, of the planned watch."""
    elapsed = rollout.result.get("elapsed_s")
    planned = rollout.planned_watch_s or rollout.result.get("planned_watch_s")
    if elapsed is None:
        return "no traffic yet"
    of = f" of {_duration(float(planned))}" if planned else " (plan: once both have traffic)"
    return f"{_duration(float(elapsed))}{of}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _worst(result: dict[str, Any]) -> str:
    """The comparison closest to a rollback: signal, segment, the two rates and its q."""
    worst = result.get("worst")
    if not isinstance(worst, dict):
        return "-"
    rates = []
    for arm in ("challenger", "champion"):
        n = worst.get(f"{arm}_n") or 0
        rates.append(f"{worst.get(f'{arm}_events', 0) / n:.1%}" if n else "-")
    q = worst.get("q_value")
    flagged = " REGRESSED" if worst.get("flagged") else ""
    q_text = f" (q={q:.3g})" if isinstance(q, int | float) else ""
    return (
        f"{worst.get('signal', '?')} on {worst.get('segment', '*')}: "
        f"{rates[0]} vs {rates[1]}{q_text}{flagged}"
    )


@models.command("announce")
@click.argument("model_id")
@_actor_option
@json_option()
@database_option
def models_announce(model_id: str, actor: str | None, as_json: bool, url: str | None) -> None:
    """Publish MODEL's aliases as they are now (after an announcement was lost)."""
    from genmon.retrain.registry import current_events

    events = current_events(engine_for(url), model_id, actor or current_user())
    _announce(model_id, events, False, as_json)


@models.command("follow")
@click.argument("model_id")
@click.option("--alias", type=click.Choice(_ALIASES), default="champion", show_default=True)
@click.option(
    "--rollout",
    is_flag=True,
    help="Follow champion and challenger together and print the traffic split.",
)
@click.option("--load", is_flag=True, help="Also load each announced adapter (torch).")
@click.option("--once", is_flag=True, help="Print the current version after the replay and stop.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Replay wait (--once)."
)
@json_option("Print each change as one JSON line.")
def models_follow(
    model_id: str,
    alias: str,
    rollout: bool,
    load: bool,
    once: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Print each version change of MODEL's ALIAS on the models topic (Ctrl-C stops).

    With --rollout, each change of the champion or the challenger, then the split it makes:
    the share of traffic the challenger gets (what `Monitor.follow(MODEL, alias="rollout")`
    routes).
    """
    if rollout and load:
        raise click.UsageError("--rollout prints the split and loads nothing; drop --load")
    changes: queue.Queue[tuple[str, ModelEvent]] = queue.Queue()
    settings = get_settings()
    if rollout:
        from genmon.follow import RolloutFollower

        follower: Any = RolloutFollower(
            settings, model_id, on_change=lambda e: changes.put(("announced", e))
        )
        ready = follower
    elif load:
        from genmon.retrain.follower import AdapterFollower

        follower = AdapterFollower(
            settings, model_id, alias, on_loaded=lambda e: changes.put(("serving", e))
        )
        ready = follower.follower
    else:
        from genmon.follow import ModelFollower

        follower = ready = ModelFollower(
            settings, model_id, alias, on_change=lambda e: changes.put(("announced", e))
        )
    try:
        if once:
            if rollout:
                _follow_split_once(follower, timeout, as_json)
            else:
                _follow_once(follower, ready, load, timeout, as_json, changes)
            return
        while True:
            try:
                _echo_change(*changes.get(timeout=0.5), as_json)
            except queue.Empty:
                continue
            if rollout:
                _echo_split(follower, as_json)
    finally:
        follower.close()


def _follow_once(
    follower: Any, ready: Any, load: bool, timeout: float, as_json: bool, changes: Any
) -> None:
    from genmon.retrain.registry import RegistryError

    if not ready.wait_ready(timeout):
        raise RegistryError(
            f"could not read {ready.topic} within {timeout:g} s; is the broker up "
            "(`genmon infra status`)?"
        )
    event = ready.event
    if event is None:
        raise RegistryError(
            f"nothing announced for {ready.model_id} {ready.alias.value} on {ready.topic}; "
            f"`genmon models announce {ready.model_id}` publishes its aliases"
        )
    if load and not follower.wait_loaded(event.version, timeout):
        raise RegistryError(
            f"{event.model_id} {event.version} did not load within {timeout:g} s: "
            f"{follower.last_error or 'still loading'}"
        )
    _echo_change("serving" if load else "announced", event, as_json)


def _follow_split_once(split: Any, timeout: float, as_json: bool) -> None:
    from genmon.retrain.registry import RegistryError

    if not split.wait_ready(timeout):
        raise RegistryError(
            f"could not read {split.topic} within {timeout:g} s; is the broker up "
            "(`genmon infra status`)?"
        )
    if split.champion is None and split.challenger is None:
        raise RegistryError(
            f"nothing announced for {split.model_id} on {split.topic}; "
            f"`genmon models announce {split.model_id}` publishes its aliases"
        )
    _echo_split(split, as_json)


def _echo_split(split: Any, as_json: bool) -> None:
    """The split a RolloutFollower makes now: who serves, and the challenger's share."""
    share = split.share if split.challenger is not None else 0.0
    if as_json:
        shown = {"champion": split.champion, "challenger": split.challenger, "share": share}
        click.echo(json.dumps({"state": "split", "model_id": split.model_id, **shown}))
        return
    challenger = f"{split.challenger} on {share:.0%} of traffic" if share else "none"
    click.echo(
        f"{split.model_id} split: champion {split.champion or '-'} serves "
        f"{1 - share:.0%}, challenger {challenger}"
    )


def _echo_change(what: str, event: ModelEvent, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"state": what, **event.model_dump(mode="json")}, sort_keys=True))
        return
    adapter = event.artifact_uri or "(base only)"
    share = f" on {event.traffic_share:.0%} of traffic" if event.traffic_share else ""
    click.echo(
        f"{when(event.at)}  {event.model_id} {event.alias.value} {what}: {event.version or '-'}"
        f"{share} ({event.action} by {event.actor}) adapter {adapter}"
    )
