"""``genmon replay FILE``: run the worker's code on a recorded stream
(:mod:`genmon.replay.engine`) and print what would have paged, and when."""

from __future__ import annotations

from pathlib import Path

import click

from genmon.cli._common import echo_json, json_option
from genmon.cli._progress import interactive, progress, spinner
from genmon.settings import get_settings


@click.command("replay")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option("Print pages, incidents and counts as JSON.")
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
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write one self-contained HTML page of charts here (needs genmon[report]).",
)
def replay(
    file: Path,
    as_json: bool,
    embeddings: bool | None,
    embedding_cache: Path | None,
    seed: int,
    database: str | None,
    report_path: Path | None,
) -> None:
    """Run the worker's code on FILE (JSON lines of inference and feedback events) and
    print what would have paged, on a clock driven by event time. With ``--report``, also
    chart every signal it judged in one HTML page (no network needed to open it)."""
    from genmon.replay.engine import Replay

    if report_path is not None:
        from genmon.replay.report import check_plotly

        check_plotly()  # before the replay, not after minutes of it
    settings = get_settings()
    cache = embedding_cache or settings.home / "replay-embeddings.sqlite"
    engine = Replay(
        settings,
        database_url=database,
        embeddings=embeddings,
        embedding_cache=cache,
        seed=seed,
        collect_points=report_path is not None,
    )
    with file.open("rb") as handle:
        if interactive(as_json):  # a progress bar for people, nothing for scripts and logs
            size = file.stat().st_size
            with progress(f"replaying {file.name}", size, unit="bytes") as advance:
                for line in handle:
                    engine.feed([line])
                    advance(len(line))
        else:
            engine.feed(handle)
    with spinner("closing the last windows", as_json=as_json):
        report = engine.finish()
    if report_path is not None:
        from genmon.replay.report import write_report

        write_report(report, report_path, source=file.name)
    if as_json:
        echo_json(report.to_json(), sort_keys=False)
    else:
        _print_report(report)
    if report_path is not None:
        # On stderr with --json, so that stdout stays one JSON document.
        click.echo(f"report written to {report_path}", err=as_json)


def _print_report(report: object) -> None:
    from genmon.replay.engine import ReplayReport

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
