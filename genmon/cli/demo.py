"""The local demo (`genmon demo`): a real broker, a real worker, real data, a real page.

What it does, on embedded defaults (Kafka from ``genmon infra up``, SQLite):

1. starts the local Kafka broker (reused if it is already up) and migrates a fresh
   SQLite database under ``<home>/demo/``;
2. starts a signed-webhook receiver on loopback and points a webhook route at it;
3. starts ``genmon worker`` as a subprocess with short windows, and the dashboard
   (``genmon api`` on loopback, no token: :mod:`genmon.cli.demo_dashboard`) whose URL it
   prints; every page the worker sends links to the incident there;
4. replays production-like traffic for a chat model through :class:`genmon.Monitor`:
   XSTest's safe prompts answered by GPT-4 (few refusals) with Groq latencies from the
   LLMPerf leaderboard, thumbs from whether the answer complied, plus a few malformed
   messages that must land in the dead-letter topic;
5. then rolls out a regression: the ``locale=de`` segment is served by Llama-2 (which
   refuses many safe prompts) and every request gets Bedrock's slower latencies;
6. prints the incidents the worker opened (with their dashboard links) and the pages the
   receiver got, then stops what it started; with ``--keep`` it leaves the dashboard, the
   workers and Kafka up until Ctrl-C, to look around.

The data sets come from ``../shared/datasets`` (``--data-dir``); nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from genmon.cli import demo_loop
from genmon.cli._progress import progress
from genmon.cli.demo_dashboard import Dashboard, dashboard_env, dashboard_settings
from genmon.settings import Settings

DEFAULT_DATA_DIR = Path("../shared/datasets")
MODEL_ID = "support-bot"
LOCALES = ("en", "de", "fr")
WINDOW_S = 5.0
#: Windows of healthy traffic the model's baselines learn before it is judged: ten windows
#: keep a reference's bounds useful (three leave its spread so uncertain that a demo's
#: short regression may not page); the healthy phase must be longer than this.
WARMUP_WINDOWS = 10
#: Longest the feedback loop may take once the worker is up (it needs about 4 minutes).
LOOP_DEADLINE_S = 420.0


@dataclass(frozen=True)
class Answer:
    prompt: str
    response: str
    refused: bool


def _answers(data_dir: Path, model: str) -> list[Answer]:
    """XSTest's safe prompts with one model's completion and the human refusal label."""
    path = data_dir / "xstest" / f"xstest_v2_completions_{model}.csv"
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["type"].startswith("contrast")]
    return [
        Answer(r["prompt"], r["completion"], not r["final_label"].startswith("1_")) for r in rows
    ]


def _latencies(data_dir: Path, provider: str) -> list[dict[str, Any]]:
    path = data_dir / "llmperf_leaderboard_latency" / "individual" / f"{provider}.json"
    return [r for r in json.loads(path.read_text()) if r.get("end_to_end_latency_s")]


class _Traffic:
    """Endless production-like requests drawn from the real data sets."""

    def __init__(self, data_dir: Path, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.healthy = _answers(data_dir, "gpt4")
        self.regressed = _answers(data_dir, "llama2orig")
        self.fast = _latencies(data_dir, "groq_70b")
        self.slow = _latencies(data_dir, "bedrock_70b")

    def requests(self, regression: bool) -> Iterator[tuple[dict[str, Any], Answer]]:
        while True:
            locale = self.rng.choice(LOCALES)
            pool = self.regressed if regression and locale == "de" else self.healthy
            answer = self.rng.choice(pool)
            timing = self.rng.choice(self.slow if regression else self.fast)
            event = {
                "model_id": MODEL_ID,
                "model_version": "v2" if regression and locale == "de" else "v1",
                "prompt": answer.prompt,
                "response": answer.response,
                "latency_ms": timing["end_to_end_latency_s"] * 1000.0,
                "time_to_first_token_ms": timing["ttft_s"] * 1000.0,
                "prompt_tokens": timing.get("number_input_tokens"),
                "completion_tokens": timing.get("number_output_tokens"),
                "segment": {"locale": locale},
            }
            yield event, answer


def _say(text: str) -> None:
    click.echo(click.style("genmon demo", fg="cyan") + f"  {text}")


def _wait_for_worker(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import httpx  # the worker extra; the SDK-only install has no demo

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise click.ClickException(
                f"the worker exited with {process.returncode}; see its log above"
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise click.ClickException(f"the worker did not answer on {url} within {timeout_s:.0f} s")


def _send_malformed(settings: Settings) -> int:
    from kafka import KafkaProducer

    from genmon.kafka_config import client_config

    bad = [b"", b"{not json", b'{"model_id": 5}', b"\xff\xfe\x00", b'{"schema_version": 99}']
    producer = KafkaProducer(**client_config(settings.kafka, producer=True))
    for payload in bad:
        producer.send(settings.topic("inference"), payload, key=MODEL_ID.encode())
    producer.flush()
    producer.close()
    return len(bad)


def _replay(
    settings: Settings, traffic: _Traffic, *, seconds: float, rate: float, regression: bool
) -> dict[str, int]:
    from genmon.sdk import Monitor

    sent = feedback = 0
    stream = traffic.requests(regression)
    label = "bad rollout" if regression else "healthy traffic"
    with Monitor(settings=settings) as monitor, progress(label, seconds, unit="s") as advance:
        started = time.monotonic()
        shown = 0.0
        while (elapsed := time.monotonic() - started) < seconds:
            advance(elapsed - shown)
            shown = elapsed
            due = int(elapsed * rate) - sent
            for _ in range(max(due, 0)):
                event, answer = next(stream)
                request_id = f"demo-{time.time_ns()}-{sent}"
                monitor.log_inference(request_id=request_id, **event)
                sent += 1
                if traffic.rng.random() < 0.5:  # half the users leave a thumb
                    thumbs = "down" if answer.refused else "up"
                    monitor.log_feedback(
                        request_id=request_id,
                        model_id=MODEL_ID,
                        thumbs=thumbs,
                        segment=event["segment"],
                    )
                    feedback += 1
            time.sleep(0.05)
        monitor.flush(timeout=30)
    return {"inferences": sent, "feedback": feedback}


def _incident_rows(url: str) -> list[Any]:
    from sqlmodel import select

    from genmon.db import make_engine, session_scope
    from genmon.schemas.incidents import Incident

    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            rows = session.exec(select(Incident).order_by(Incident.opened_at)).all()
            return [Incident.model_validate(row) for row in rows]
    finally:
        engine.dispose()


@click.command("demo")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="the shared public data sets",
)
@click.option("--rate", default=60.0, show_default=True, help="requests per second replayed")
@click.option(
    "--healthy-s",
    default=60.0,
    show_default=True,
    help=f"seconds of healthy traffic (baselines learn the first {WARMUP_WINDOWS * WINDOW_S:g} s)",
)
@click.option(
    "--regression-s",
    default=30.0,
    show_default=True,
    help="seconds of traffic after the bad rollout",
)
@click.option(
    "--keep",
    is_flag=True,
    help="after the story, keep the dashboard (and the workers) up until Ctrl-C; "
    "leave Kafka running afterwards",
)
@click.option(
    "--loop/--no-loop",
    default=True,
    show_default=True,
    help="also close the feedback loop on a tiny model: incident -> retraining -> new version",
)
@click.option(
    "--database-url",
    default=None,
    help="database to use (default: a fresh SQLite file under <home>/demo/)",
)
def demo(
    data_dir: Path,
    rate: float,
    healthy_s: float,
    regression_s: float,
    keep: bool,
    loop: bool,
    database_url: str | None,
) -> None:
    """Run genmon end to end on this machine and show what on-call would see."""
    from genmon.db import make_engine, safe_url, upgrade
    from genmon.incidents.receiver import WebhookReceiver
    from genmon.infra.kafka import KafkaBroker

    if not (data_dir / "xstest").is_dir():
        raise click.ClickException(
            f"no data sets under {data_dir}; pass --data-dir pointing at shared/datasets"
        )
    base = Settings()
    run = f"demo{int(time.time())}"
    work = base.home / "demo"
    work.mkdir(parents=True, exist_ok=True)
    db_path = work / "demo.sqlite"
    for stale in work.glob("demo.sqlite*"):
        stale.unlink()
    db_url = database_url or f"sqlite:///{db_path}"
    secret = "demo-webhook-secret"

    broker = KafkaBroker(base)
    was_running = broker.status().running
    _say(f"Kafka {'already up' if was_running else 'starting'} on {base.kafka.bootstrap_servers}")
    broker.up()
    upgrade(db_url)
    _say(f"database migrated: {safe_url(db_url)}")

    receiver = WebhookReceiver(secret=secret)
    receiver.start()
    destinations = work / "destinations.yaml"
    destinations.write_text(
        "destinations:\n"
        f"  - {{name: oncall, type: webhook, url: '{receiver.url}', secret: '{secret}'}}\n"
        "routes:\n"
        "  - destinations: [oncall]\n"
    )
    _say(f"on-call webhook receiver listening on {receiver.url} (HMAC-signed)")

    web_port = base.worker.web_port
    api = dashboard_settings(base.api)
    env = {
        **os.environ,
        "GENMON_KAFKA__TOPIC_PREFIX": run,
        "GENMON_WORKER__APP_ID": run,
        "GENMON_DATABASE__URL": db_url,
        "GENMON_NOTIFY__DESTINATIONS_FILE": str(destinations),
        "GENMON_WINDOWS__TUMBLING_S": str(WINDOW_S),
        "GENMON_WINDOWS__ALLOWED_LATENESS_S": "1",
        "GENMON_WINDOWS__IDLE_TIMEOUT_S": "2",
        "GENMON_DETECTORS__MIN_WINDOW_REQUESTS": "20",
        # The model's baselines learn from the healthy phase's first windows (15 by
        # default: minutes of 60 s windows; a demo has seconds).
        "GENMON_DETECTORS__BASELINE_WARMUP_WINDOWS": str(WARMUP_WINDOWS),
        "GENMON_EMBEDDING__ENABLED": "false",
        # The pages the worker sends link to the demo's dashboard.
        **dashboard_env(api),
    }
    setup = demo_loop.prepare(work, data_dir, _say) if loop else None
    env.update(setup.env if setup else {})
    settings = Settings(kafka=base.kafka.model_copy(update={"topic_prefix": run}))
    log_path = work / "worker.log"
    _say(f"starting `genmon worker` (topics {run}.*, log {log_path})")
    workers = [_start(["worker"], env, log_path)]
    if setup is not None:
        retrain_log = work / "retrain-worker.log"
        _say(f"starting `genmon worker --role retrain` (log {retrain_log})")
        workers.append(_start(["worker", "--role", "retrain"], env, retrain_log))
    dashboard = _dashboard(api, env, work / "api.log")
    loop_thread: _LoopThread | None = None
    try:
        _wait_for_worker(f"http://127.0.0.1:{web_port}/stats", workers[0], timeout_s=180)
        if dashboard is not None:
            dashboard.wait_ready()
            _say(f"dashboard: {dashboard.url} (loopback, no token; log {dashboard.log_path})")
        if setup is not None:
            loop_settings = settings.model_copy(
                update={
                    "database": settings.database.model_copy(update={"url": db_url}),
                    "notify": settings.notify.model_copy(
                        update={"destinations_file": destinations}
                    ),
                }
            )
            loop_thread = _LoopThread(loop_settings, make_engine(db_url), setup, data_dir, receiver)
            loop_thread.start()
        traffic = _Traffic(data_dir)
        dead = _send_malformed(settings)
        _say(f"sent {dead} malformed messages: they go to {run}.deadletter with a reason")
        _say(
            f"phase 1: {healthy_s:.0f} s of healthy traffic at {rate:.0f} req/s "
            "(GPT-4 answers, Groq latencies)"
        )
        counts = _replay(settings, traffic, seconds=healthy_s, rate=rate, regression=False)
        _say(f"  sent {counts['inferences']} inferences, {counts['feedback']} feedback")
        _say(
            f"phase 2: {regression_s:.0f} s after a bad rollout (locale=de served by "
            "Llama-2 v2, Bedrock latencies for everyone)"
        )
        counts = _replay(settings, traffic, seconds=regression_s, rate=rate, regression=True)
        _say(f"  sent {counts['inferences']} inferences, {counts['feedback']} feedback")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not receiver.unique:
            time.sleep(1.0)
        time.sleep(3 * WINDOW_S)  # let the last windows close and their pages go out
        stats_url = f"http://127.0.0.1:{web_port}/stats"
        stats = json.loads(urllib.request.urlopen(stats_url, timeout=5).read())
        _report(stats, _incident_rows(db_url), receiver, api)
        if loop_thread is not None:
            loop_thread.join()
            if loop_thread.error is not None:
                raise loop_thread.error
            assert loop_thread.lineage is not None
            demo_loop.report(loop_thread.lineage, _say)
            if not loop_thread.lineage.resolved:
                raise click.ClickException(
                    "the feedback loop did not finish; see .build/demo/retrain-worker.log"
                )
        if keep:
            _keep_up(dashboard, workers)
    finally:
        if loop_thread is not None:
            loop_thread.stop()
        if dashboard is not None:
            dashboard.stop()
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        receiver.stop()
        if not was_running and not keep:
            broker.down()
            _say("Kafka stopped (it was started by the demo; --keep leaves it up)")


def _dashboard(api: Any, env: dict[str, str], log_path: Path) -> Dashboard | None:
    """Start ``genmon api`` for the demo, or say why there is none (no ``api`` extra)."""
    from importlib.util import find_spec

    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        _say("no dashboard: it needs the `api` extra (pip install 'genmon[api]')")
        return None
    _say(f"starting the dashboard (`genmon api` on {api.host}:{api.port})")
    dashboard = Dashboard(api, env, log_path)
    dashboard.start()
    return dashboard


def _keep_up(dashboard: Dashboard | None, workers: list[subprocess.Popen[bytes]]) -> None:
    """``--keep``: leave what the story started running until Ctrl-C or SIGTERM (or until
    the dashboard or a worker stops by itself); the caller then stops it all. The
    handlers are installed here, not inherited: a shell starts a background job with
    Ctrl-C ignored, and SIGTERM would otherwise end the demo without stopping its
    children."""
    where = f" at {dashboard.url}" if dashboard is not None else ""
    _say(f"the dashboard stays up{where} with the workers; Ctrl-C stops them")
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.is_set() and all(process.poll() is None for process in workers):
            if dashboard is not None and not dashboard.running():
                break
            stop.wait(0.5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _say("stopping the dashboard and the workers")


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "genmon.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


class _LoopThread(threading.Thread):
    """The feedback loop (:mod:`genmon.cli.demo_loop`), beside the monitoring story."""

    def __init__(
        self, settings: Settings, engine: Any, setup: Any, data_dir: Path, receiver: Any
    ) -> None:
        super().__init__(name="demo-loop", daemon=True)
        self.args = (settings, engine, setup, data_dir)
        self.receiver = receiver
        self.lineage: demo_loop.Lineage | None = None
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self.lineage = demo_loop.run(
                *self.args,
                warmup_s=WARMUP_WINDOWS * WINDOW_S + 10,
                deadline_s=LOOP_DEADLINE_S,
                receiver=self.receiver,
                say=lambda text: _say(f"[{demo_loop.LOOP_MODEL}] {text}"),
                stopping=self.stopping,
            )
        except BaseException as exc:  # re-raised by the demo's main thread
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=90)


def _report(stats: dict[str, Any], incidents: list[Any], receiver: Any, api: Any) -> None:
    ingest = stats.get("ingest", {})
    _say(f"worker counters: {json.dumps(ingest, sort_keys=True)[:400]}")
    _say(f"{len(incidents)} incident(s):")
    for incident in incidents:
        click.echo(
            f"    [{incident.severity}] {incident.status:<12} {incident.title}  "
            f"(findings: {incident.finding_count})"
        )
        click.echo(f"        {api.incident_url(incident.id)}")
    # Only the incidents' pages: the receiver also gets the model registry's announcements.
    pages = [page for page in receiver.unique.values() if "incident" in (page.json or {})]
    _say(f"{len(pages)} signed page(s) received by on-call ({receiver.rejected} rejected):")
    for page in pages[:10]:
        body = page.json
        click.echo(f"    {body.get('event', '?'):<10} {body.get('incident', {}).get('title', '')}")
    if not incidents:
        raise click.ClickException("no incident was opened; see .build/demo/worker.log")
