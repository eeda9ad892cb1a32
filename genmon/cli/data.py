"""``genmon data``: what genmon keeps about people: erase, export, opt-out, retention.

The privacy room (:mod:`genmon.privacy`) is imported inside the commands so
``genmon --help`` stays instant. The subject id is printed back only as it was given;
the audit keeps its sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from genmon.cli._common import (
    current_user,
    database_option,
    echo_json,
    echo_table,
    engine_for,
    json_option,
)
from genmon.cli._progress import spinner
from genmon.settings import get_settings

SUBJECT_HELP = "The data subject's id (as the SDK's subject_id sent it)."


@click.group()
def data() -> None:
    """Erase or export a data subject's data, opt them out of training, apply retention."""


def _by(function: Any) -> Any:
    return click.option("--by", "actor", default=None, help="Who asks; default: your user name.")(
        function
    )


@data.command("erase")
@click.option("--subject", "subject_id", required=True, help=SUBJECT_HELP)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_by
@json_option()
@database_option
def data_erase(
    subject_id: str, yes: bool, actor: str | None, as_json: bool, url: str | None
) -> None:
    """Remove the subject's text everywhere genmon stored it; list the model versions
    trained on it."""
    from genmon.privacy.erasure import erase_subject

    if not yes:
        click.confirm(
            f"Erase every text of data subject {subject_id} (examples, exemplars in incidents "
            "and notifications, built datasets)? This cannot be undone",
            abort=True,
            err=True,
        )
    with spinner(f"erasing data subject {subject_id} everywhere", as_json=as_json):
        report = erase_subject(
            engine_for(url), get_settings(), subject_id, requested_by=actor or current_user()
        )
    if as_json:
        echo_json(report.to_json())
        return
    if not report.found:
        click.echo(
            f"nothing held about data subject {subject_id} (erased already, or never stored); "
            f"audit {report.audit_id}"
        )
    else:
        click.echo(f"erased data subject {subject_id} (audit {report.audit_id}):")
        echo_table(
            [[place, str(n)] for place, n in sorted(report.counts.items())], ["PLACE", "COUNT"]
        )
    _echo_versions(report.model_versions)
    for job_id in report.running_jobs:
        click.echo(
            f"job {job_id} is training on this subject's data now: cancel it "
            f"(genmon retrain cancel {job_id}) and request a new one",
            err=True,
        )
    for note in report.notes:
        click.echo(f"note: {note}")


def _echo_versions(versions: list[dict[str, Any]]) -> None:
    if not versions:
        click.echo("no model version was trained on this subject's data")
        return
    click.echo("model versions trained on this subject's data:")
    rows = [
        [v["model_id"], v["version"], v["status"], v["job_id"] or "-", v["via"]] for v in versions
    ]
    echo_table(rows, ["MODEL", "VERSION", "STATUS", "JOB", "VIA"])


@data.command("export")
@click.option("--subject", "subject_id", required=True, help=SUBJECT_HELP)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON to this file (readable by you only) instead of printing it.",
)
@_by
@database_option
def data_export(subject_id: str, out: Path | None, actor: str | None, url: str | None) -> None:
    """Everything genmon holds about the subject, as JSON."""
    from genmon.privacy.export import export_subject

    # Printed as JSON without --out: a spinner only when it goes to a file.
    with spinner(f"collecting what genmon holds about {subject_id}", as_json=out is None):
        held = export_subject(
            engine_for(url), get_settings(), subject_id, requested_by=actor or current_user()
        )
    if out is None:
        echo_json(held)
        return
    text = json.dumps(held, indent=2, default=str, sort_keys=True)
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    counts = ", ".join(f"{k} {v}" for k, v in held["counts"].items())
    click.echo(f"wrote {out} ({counts})")


@data.command("opt-out")
@click.option("--subject", "subject_id", required=True, help=SUBJECT_HELP)
@click.option("--note", default="", help="Why, or the request's reference.")
@_by
@database_option
def data_opt_out(subject_id: str, note: str, actor: str | None, url: str | None) -> None:
    """Keep the subject's feedback out of every dataset built from now on."""
    from genmon.privacy.optout import opt_out

    if opt_out(engine_for(url), subject_id, actor or current_user(), note):
        click.echo(f"data subject {subject_id} opted out of training")
    else:
        click.echo(f"data subject {subject_id} had opted out already")


@data.command("opt-in")
@click.option("--subject", "subject_id", required=True, help=SUBJECT_HELP)
@_by
@database_option
def data_opt_in(subject_id: str, actor: str | None, url: str | None) -> None:
    """Let the subject's feedback train models again."""
    from genmon.privacy.optout import opt_in

    if opt_in(engine_for(url), subject_id, actor or current_user()):
        click.echo(f"data subject {subject_id} opted in again")
    else:
        click.echo(f"data subject {subject_id} had not opted out")


@data.command("retention")
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@json_option()
@database_option
def data_retention(dry_run: bool, as_json: bool, url: str | None) -> None:
    """Delete what is older than settings.retention allows (the scheduler runs this
    daily; GENMON_RETENTION__*_DAYS)."""
    from genmon.privacy.retention import run_retention

    doing = "counting what retention would remove" if dry_run else "applying retention"
    with spinner(doing, as_json=as_json):
        report = run_retention(engine_for(url), get_settings(), dry_run=dry_run)
    if as_json:
        echo_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"retention ({verb}):")
    rows = [
        [r.kind, str(r.removed), r.cutoff.strftime("%Y-%m-%d %H:%M") if r.cutoff else "-", r.note]
        for r in report.kinds.values()
    ]
    echo_table(rows, ["KIND", verb.upper(), "OLDER THAN (UTC)", "NOTE"])
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
