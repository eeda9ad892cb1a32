"""``genmon detectors list``: each default detector's share of the false-alarm budget
(``detectors.false_pages_per_week``), in users' units."""

from __future__ import annotations

import click

from genmon.cli._common import echo_json, json_option
from genmon.settings import get_settings


@click.group("detectors")
def detectors() -> None:
    """The default detectors and their false-alarm budget."""


@detectors.command("list")
@json_option("One JSON object, for scripts.")
def detectors_list(as_json: bool) -> None:
    """Each default detector's share of the false-page budget, in pages per model-week."""
    from genmon.detectors.calibration.budget import Budget

    settings = get_settings()
    budget = Budget(settings)
    rows = budget.table()
    if as_json:
        echo_json(
            {
                "false_pages_per_week": budget.pages_per_week,
                "window_s": budget.window_s,
                "detectors": rows,
            },
            sort_keys=False,
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
