"""``genmon detectors list``: what the detector plan runs for each model glob (or one model),
with each detector's share of the false-alarm budget (``detectors.false_pages_per_week``)
in users' units. It loads the plan as the worker does, so a malformed file fails here
with the same ``file:line: field: problem`` lines (exit 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from genmon.cli._common import echo_json, json_option
from genmon.settings import get_settings


@click.group("detectors")
def detectors() -> None:
    """The detector plan and its false-alarm budget."""


@detectors.command("list")
@click.option("--model", "model_id", default=None, help="What runs for this model id.")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A detector plan to check and show; default detectors.config_file (genmon's own).",
)
@click.option(
    "--markdown",
    is_flag=True,
    help="Print the README's tables: what the plan runs for any model, and the signals.",
)
@json_option("One JSON object, for scripts.")
def detectors_list(model_id: str | None, path: Path | None, markdown: bool, as_json: bool) -> None:
    """Each detector of the plan per model glob (or for one model): signal, detector,
    params, severity, share, false pages per model-week and time between them, source line."""
    from genmon.detectors.calibration.budget import Budget, plan_markdown
    from genmon.detectors.calibration.catalog import catalog_markdown
    from genmon.detectors.calibration.plan import load_plan

    settings = get_settings()
    plan = load_plan(settings, path)
    budget = Budget(settings, plan)
    if markdown:
        click.echo(plan_markdown(budget, model_id or "*"))
        click.echo("")
        click.echo(catalog_markdown())
        return
    groups: list[tuple[str, str | None, str]]
    if model_id is not None:
        groups = [(f"model {model_id!r}", None, model_id)]
    else:
        groups = [
            (f"models matching {pattern!r}", f"{plan.display}:{line}", _example(pattern))
            for pattern, line, _ in plan.blocks
        ]
    tables = [(title, source, budget.table(example)) for title, source, example in groups]
    if as_json:
        _print_json(budget, plan.display, model_id, plan.blocks, tables)
        return
    click.echo(
        f"plan: {plan.display}; budget: {budget.pages_per_week:g} false page(s) per model per"
        f" week (detectors.false_pages_per_week), windows of {budget.window_s:g} s"
    )
    for title, source, rows in tables:
        click.echo("")
        click.echo(title + (f" ({source})" if source else ""))
        _print_rows(rows, budget.pages_per_week)


def _example(pattern: str) -> str:
    from genmon.detectors.calibration.plan import example_id

    return example_id(pattern) or pattern


def _print_rows(rows: list[dict[str, Any]], pages_per_week: float) -> None:
    click.echo(
        f"{'signal':<19} {'detector':<21} {'severity':<8} {'share':>6} {'pages/week':>10}"
        f" {'every':>11}  {'source':<28} params"
    )
    for row in rows:
        every = row["hours_between_false_pages"]
        click.echo(
            f"{row['signal']:<19} {row['detector']:<21} {row['severity']:<8}"
            f" {row['share']:>6.0%} {row['false_pages_per_model_week']:>10.3g}"
            f" {_every(every) if every is not None else 'outside':>11}  {row['source']:<28}"
            f" {_params(row['params'])}"
        )
    total = sum(row["share"] for row in rows)
    outside = sum(not row["inside_budget"] for row in rows)
    pages = total * pages_per_week
    every = f", one every {_every(7 * 24 / pages)} at most" if pages > 0 else ""
    click.echo(
        f"total: {len(rows)} detectors, shares {total:.0%} of the budget: {pages:.3g} false"
        f" page(s) per model-week{every}; {outside} outside the budget (share 0, thresholds"
        " their own)"
    )


def _print_json(
    budget: Any,
    display: str,
    model_id: str | None,
    blocks: list[Any],
    tables: list[tuple[str, str | None, list[dict[str, Any]]]],
) -> None:
    def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
        share = sum(row["share"] for row in rows)
        return {"total_share": share, "false_pages_per_model_week": share * budget.pages_per_week}

    head = {
        "file": display,
        "false_pages_per_week": budget.pages_per_week,
        "window_s": budget.window_s,
    }
    if model_id is not None:
        rows = tables[0][2]
        echo_json(
            {**head, "model_id": model_id, "detectors": rows, **totals(rows)}, sort_keys=False
        )
        return
    models = [
        {"match": pattern, "source": source, "detectors": rows, **totals(rows)}
        for (pattern, _, _), (_, source, rows) in zip(blocks, tables, strict=True)
    ]
    echo_json({**head, "models": models}, sort_keys=False)


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _every(hours: float) -> str:
    if hours >= 24 * 7:
        weeks = f"{hours / 24 / 7:.3g}"
        return f"{weeks} week" if weeks == "1" else f"{weeks} weeks"
    return f"{hours / 24:.3g} days" if hours >= 24 else f"{hours:.3g} h"
