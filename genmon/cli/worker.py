"""``genmon worker`` (the Faust stream processor) and ``genmon health`` (is it up?)."""

from __future__ import annotations

import urllib.error
import urllib.request

import click

from genmon.cli._common import echo_json, fail_check, json_option
from genmon.settings import get_settings


@click.command()
@click.option(
    "--loglevel",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Default settings.worker.loglevel (GENMON_WORKER__LOGLEVEL).",
)
@click.option(
    "--web-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port of /metrics and /stats; default settings.worker.web_port.",
)
@click.option(
    "--role",
    type=click.Choice(["all", "embed", "incidents", "retrain"]),
    default="all",
    show_default=True,
    help="embed: only the text encoder (genmon.streams.embedding.stage); incidents: only "
    "findings -> incidents -> pages (genmon.streams.incident_agent); retrain: triggers, "
    "the rollout watch and the retraining job queue (genmon.retrain.runner; any number, on "
    "any machines sharing the database).",
)
def worker(loglevel: str | None, web_port: int | None, role: str) -> None:
    """Run the stream worker (ingest, dead letters, pipeline) until Ctrl-C or SIGTERM."""
    if role == "retrain":
        from genmon.retrain.runner import run_retrain_worker
        from genmon.scheduler.service import scheduler_running

        with scheduler_running(get_settings()):  # one leads across workers: scheduler.enabled
            run_retrain_worker(get_settings(), loglevel=loglevel)
        return
    from genmon.streams.app import run_worker
    from genmon.streams.embedding.stage import run_embed_worker
    from genmon.streams.incident_agent import run_incidents_worker

    settings = get_settings()
    if web_port is not None:
        settings = settings.model_copy(
            update={"worker": settings.worker.model_copy(update={"web_port": web_port})}
        )
    runners = {"all": run_worker, "embed": run_embed_worker, "incidents": run_incidents_worker}
    runners[role](settings, loglevel=loglevel)


@click.command()
@click.option(
    "--url",
    default=None,
    help="The worker's stats page; default http://127.0.0.1:<settings.worker.web_port>/stats.",
)
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds to wait.")
@json_option("Print the worker's /stats as JSON.")
def health(url: str | None, timeout_s: float, as_json: bool) -> None:
    """Exit 0 when the worker answers on its web port, 1 when it does not (a healthcheck)."""
    url = url or f"http://127.0.0.1:{get_settings().worker.web_port}/stats"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as error:
        click.echo(f"worker: no answer on {url} ({error}); is `genmon worker` running?", err=True)
        fail_check()
        return
    if as_json:
        import json

        echo_json(json.loads(body))
        return
    click.echo(f"worker: up ({url})")
