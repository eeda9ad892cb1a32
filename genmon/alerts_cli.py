"""``genmon detectors list`` and ``genmon replay FILE``: what pages, and what would have.

``detectors list`` prints each default detector's share of the false-alarm budget
(``detectors.false_pages_per_week``) in users' units; ``replay`` runs the worker's code on a
recorded stream (:mod:`genmon.streams.replay`) and prints what would have paged and when.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from genmon.settings import get_settings


@click.group("detectors")
def detectors() -> None:
    """The default detectors and their false-alarm budget."""


@detectors.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def detectors_list(as_json: bool) -> None:
    """Each default detector's share of the false-page budget, in pages per model-week."""
    from genmon.streams.budget import Budget

    settings = get_settings()
    budget = Budget(settings)
    rows = budget.table()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "false_pages_per_week": budget.pages_per_week,
                    "window_s": budget.window_s,
                    "detectors": rows,
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"false-alarm budget: {budget.pages_per_week:g} page(s) per model per week "
        f"(detectors.false_pages_per_week), windows of {budget.window_s:g} s"
    )
    header = (
        f"{'signal':<20} {'kind':<8} {'test':<16} {'share':>6} {'pages/week':>11} {'every':>10}"
    )
    click.echo(header)
    for row in rows:
        click.echo(
            f"{row['signal']:<20} {row['kind']:<8} {row['test']:<16} "
            f"{row['share']:>6.0%} {row['false_pages_per_model_week']:>11.3g} "
            f"{_every(float(row['hours_between_false_pages'])):>10}"
        )
    click.echo(
        "each is an upper bound for a healthy model, however many versions and segments"
        " it has; SLOs (detectors.slos) page on top of it"
    )


def _every(hours: float) -> str:
    if hours >= 24 * 7:
        return f"{hours / 24 / 7:.3g} weeks"
    return f"{hours / 24:.3g} days" if hours >= 24 else f"{hours:.3g} h"


@click.command("replay")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print pages, incidents and counts as JSON.")
@click.option(
    "--embeddings/--no-embeddings",
    default=None,
    help="Sample and embed texts for drift (default: settings.embedding.enabled).",
)
@click.option(
    "--embedding-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite file of embeddings by text hash (default: <home>/replay-embeddings.sqlite).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the embedding sampler.")
@click.option(
    "--database",
    default=None,
    help="Keep the incidents in this SQLAlchemy URL (default: a temporary SQLite file).",
)
def replay(
    file: Path,
    as_json: bool,
    embeddings: bool | None,
    embedding_cache: Path | None,
    seed: int,
    database: str | None,
) -> None:
    """Run the worker's code on FILE (JSON lines of inference and feedback events) and
    print what would have paged, on a clock driven by event time."""
    from genmon.streams.replay import Replay

    settings = get_settings()
    cache = embedding_cache or settings.home / "replay-embeddings.sqlite"
    engine = Replay(
        settings,
        database_url=database,
        embeddings=embeddings,
        embedding_cache=cache,
        seed=seed,
    )
    with file.open("rb") as handle:
        if sys.stderr.isatty():  # a progress bar for people, nothing for scripts and logs
            size = file.stat().st_size
            with click.progressbar(length=size, label="replaying", file=sys.stderr) as bar:
                for line in handle:
                    engine.feed([line])
                    bar.update(len(line))
        else:
            engine.feed(handle)
    report = engine.finish()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
        return
    _print_report(report)


def _print_report(report: object) -> None:
    from genmon.streams.replay import ReplayReport

    assert isinstance(report, ReplayReport)
    counts = report.counts
    click.echo(
        f"{counts['inference_events']:,} inferences, {counts['feedback_events']:,} feedback, "
        f"{counts['windows_closed']:,} windows: {counts['incidents']} incident(s), "
        f"{counts['triggers']} page(s) that call someone"
    )
    if not report.pages:
        click.echo("nothing would have paged")
        return
    click.echo(f"{'at (event time)':<26} {'transition':<11} {'severity':<9} title")
    for page in report.pages:
        click.echo(f"{page.at[:25]:<26} {page.transition:<11} {page.severity:<9} {page.title}")
