"""genmon's own heartbeat (the watchdog): what each destination gets, how often, and that
it stops when genmon stops, down to a real `genmon worker --role incidents` process."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from incident_support import ALERTMANAGER, ROUTING_KEY, FakeClock, migrated_engine, sqlite_url
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.receiver import Received, WebhookReceiver
from genmon.incidents.signing import SIGNATURE_HEADER, verify_signature
from genmon.incidents.watchdog import (
    ENDS_AFTER_INTERVALS,
    HEARTBEAT_SCHEMA,
    Watchdog,
    watchdog_targets,
)
from genmon.infra.kafka import KafkaBroker
from genmon.settings import DestinationSettings, Settings

GENMON = str(Path(sys.executable).with_name("genmon"))
SECRET = "watchdog-test-secret"
TOKEN = "HEARTBEAT-URL-TOKEN"


def _dest(name: str, **config: Any) -> DestinationSettings:
    config.setdefault("url", f"http://127.0.0.1:9/{name}")
    return DestinationSettings.model_validate({"name": name, **config})


def _settings(*destinations: DestinationSettings, **notify: Any) -> Settings:
    return Settings.model_validate(
        {"notify": {"destinations": [d.model_dump() for d in destinations], **notify}}
    )


class FakeTime:
    """Monotonic time that only moves when the watchdog sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.woke: list[float] = []
        self.limit = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.woke.append(self.now)
        if len(self.woke) >= self.limit:
            await asyncio.Event().wait()  # parked until stop() cancels it


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


# --- who gets what -------------------------------------------------------------------------


def test_only_destinations_that_can_watch_for_silence_get_a_heartbeat() -> None:
    destinations = [
        _dest("am", type="alertmanager"),
        _dest("am-off", type="alertmanager", watchdog=False),
        _dest("am-both", type="alertmanager", heartbeat_url="http://127.0.0.1:9/hb"),
        _dest("pd", type="pagerduty", routing_key=ROUTING_KEY),
        _dest("pd-hb", type="pagerduty", routing_key=ROUTING_KEY, heartbeat_url="http://x/1"),
        _dest("slack", type="slack"),
        _dest("hook-hb", heartbeat_url="http://127.0.0.1:9/hb", watchdog=True),
        _dest("hook-hb-off", heartbeat_url="http://127.0.0.1:9/hb", watchdog=False),
    ]
    got = [(t.destination.name, t.kind) for t in watchdog_targets(destinations)]
    assert got == [
        ("am", "alertmanager"),
        ("am-both", "alertmanager"),
        ("am-both", "heartbeat_url"),
        ("pd-hb", "heartbeat_url"),
        ("hook-hb", "heartbeat_url"),
    ]
    assert Watchdog.from_settings(_settings(destinations[0]), destinations[:1]) is not None
    off = _settings(destinations[0], watchdog_interval_s=0)
    assert Watchdog.from_settings(off, destinations[:1]) is None
    nothing = [destinations[3], destinations[5]]
    assert Watchdog.from_settings(_settings(*nothing), nothing) is None


def test_the_watchdog_alert_is_alertmanagers_payload_always_firing_and_ending_ahead() -> None:
    clock = FakeClock()
    started = clock.now
    watchdog = Watchdog([_dest("am", type="alertmanager")], 60, labels={"deployment": "prod"})
    watchdog.clock, watchdog.started_at = clock, started
    (target,) = watchdog.targets
    first = httpx.Response(200, content=watchdog.render(target, clock.now).body).json()
    clock.advance(60)
    second_request = watchdog.render(target, clock.now)
    second = httpx.Response(200, content=second_request.body).json()
    for payload in (first, second):
        jsonschema.validate(payload, ALERTMANAGER)
        (alert,) = payload["alerts"]
        assert payload["status"] == alert["status"] == "firing"
        assert alert["labels"] == {
            "alertname": "Watchdog",
            "severity": "none",
            "deployment": "prod",
        }
        assert alert["startsAt"] == started.isoformat().replace("+00:00", "Z")
    ends = [p["alerts"][0]["endsAt"] for p in (first, second)]
    assert ends == [
        (started + timedelta(seconds=s + ENDS_AFTER_INTERVALS * 60)).isoformat()[:19] + "Z"
        for s in (0, 60)
    ]
    # One alert, re-posted: the same fingerprint; each post a delivery of its own.
    assert first["alerts"][0]["fingerprint"] == second["alerts"][0]["fingerprint"]
    keys = {p["commonAnnotations"]["idempotency_key"] for p in (first, second)}
    assert len(keys) == 2
    assert second_request.headers["Idempotency-Key"] in keys
    assert SIGNATURE_HEADER not in second_request.headers  # no secret, no signature


def test_a_heartbeat_ping_is_signed_when_the_destination_has_a_secret() -> None:
    hook = _dest("hook", heartbeat_url=f"http://127.0.0.1:9/ping/{TOKEN}", secret=SECRET)
    watchdog = Watchdog([hook], 30)
    (target,) = watchdog.targets
    request = watchdog.render(target, FakeClock().now)
    assert request.url.endswith(TOKEN)
    assert verify_signature(SECRET, request.headers, request.body, now=time.time())
    body = httpx.Response(200, content=request.body).json()
    assert body["schema"] == HEARTBEAT_SCHEMA
    assert body["idempotency_key"] == request.headers["webhook-id"]
    assert body["interval_s"] == 30


# --- pacing, failures, health --------------------------------------------------------------


def test_it_beats_every_interval_and_skips_rather_than_bursts_after_a_slow_beat() -> None:
    fake = FakeTime()
    fake.limit = 5
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(fake.now)
        if len(sent_at) == 2:
            fake.now += 25.0  # this beat hangs for 2.5 intervals
        return httpx.Response(200)

    watchdog = Watchdog([_dest("am", type="alertmanager")], 10, monotonic=fake, sleep=fake.sleep)

    async def scenario() -> None:
        async with _client(handler) as client:
            watchdog.start(client)
            while len(fake.woke) < fake.limit:
                await asyncio.sleep(0)
            await watchdog.stop()
            assert not watchdog.running

    asyncio.run(scenario())
    assert sent_at == [0.0, 10.0, 35.0, 45.0, 55.0]


def test_failures_are_never_fatal_and_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    registry = CollectorRegistry()
    down = {"am": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/ping"):
            raise httpx.ConnectError(f"cannot reach {request.url}")
        return httpx.Response(503 if down["am"] else 200, text="try later")

    destinations = [
        _dest("am", type="alertmanager"),
        _dest("hook", heartbeat_url=f"http://127.0.0.1:9/ping/{TOKEN}"),
    ]
    watchdog = Watchdog(destinations, 1, monotonic=fake, log_every_s=30, registry=registry)

    async def beats(count: int) -> list[int]:
        async with _client(handler) as client:
            sent = []
            for _ in range(count):
                sent.append(await watchdog.beat(client))
                fake.now += 1
            return sent

    with caplog.at_level(logging.INFO, logger="genmon.incidents.watchdog"):
        assert asyncio.run(beats(10)) == [0] * 10
        fake.now += 30
        asyncio.run(beats(1))
        down["am"] = False
        assert asyncio.run(beats(1)) == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    am = [w for w in warnings if "heartbeat to am failed" in w]
    ping = [w for w in warnings if "heartbeat to hook/heartbeat_url failed" in w]
    assert len(am) == 2 and len(ping) == 2, warnings
    assert "HTTP 503" in am[0] and "(and 9 more since the last report)" in am[1]
    assert "ConnectError" in ping[0] and "(and 9 more since the last report)" in ping[1]
    assert any("am delivered again after 11 failed beats" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text

    def count(destination: str, outcome: str) -> float | None:
        labels = {"destination": destination, "outcome": outcome}
        return registry.get_sample_value("genmon_watchdog_heartbeats_total", labels)

    assert (count("am", "failed"), count("am", "sent"), count("hook", "failed")) == (11, 1, 12)


def test_a_url_that_takes_no_post_is_pinged_with_get() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return httpx.Response(405 if request.method == "POST" else 200)

    watchdog = Watchdog([_dest("hook", heartbeat_url="http://127.0.0.1:9/hb")], 1)

    async def beats() -> list[int]:
        async with _client(handler) as client:
            return [await watchdog.beat(client) for _ in range(2)]

    assert asyncio.run(beats()) == [1, 1]
    assert seen == ["POST", "GET", "GET"]


def test_beats_are_held_back_while_unhealthy(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    healthy = {"now": False}
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200)

    watchdog = Watchdog(
        [_dest("am", type="alertmanager")],
        1,
        monotonic=fake,
        healthy=lambda: healthy["now"],
        log_every_s=30,
    )

    async def beats(count: int) -> list[int]:
        async with _client(handler) as client:
            return [await watchdog.beat(client) for _ in range(count)]

    with caplog.at_level(logging.WARNING, logger="genmon.incidents.watchdog"):
        assert asyncio.run(beats(3)) == [0, 0, 0]
    assert requests == []
    assert len([r for r in caplog.records if "held back" in r.getMessage()]) == 1
    healthy["now"] = True
    assert asyncio.run(beats(1)) == [1]


# --- with the dispatcher -------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = migrated_engine(sqlite_url(tmp_path))
    yield engine
    engine.dispose()


def _heartbeats(receiver: WebhookReceiver, path: str) -> list[Received]:
    return [r for r in receiver.requests if r.path == path]


def test_the_dispatcher_beats_while_it_runs_and_not_after(engine: Engine) -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        base = f"http://{receiver.host}:{receiver.port}"
        settings = _settings(
            _dest("am", type="alertmanager", url=f"{base}/am", secret=SECRET),
            _dest("hook", url=f"{base}/hook", heartbeat_url=f"{base}/ping", secret=SECRET),
            watchdog_interval_s=0.2,
            poll_interval_s=0.05,
        )
        dispatcher = Dispatcher(engine, settings)
        assert dispatcher.watchdog is not None
        assert not dispatcher._healthy()  # nothing read yet: no beat vouches for it

        async def scenario() -> int:
            stop = asyncio.Event()
            runner = asyncio.create_task(dispatcher.run(stop))
            arrived = await asyncio.to_thread(receiver.wait_for, 6, 20.0)
            assert arrived, receiver.requests
            assert dispatcher._healthy()
            stop.set()
            await asyncio.wait_for(runner, 10)
            assert dispatcher.watchdog is not None and not dispatcher.watchdog.running
            return len(receiver.requests)

        at_stop = asyncio.run(scenario())
        time.sleep(3 * 0.2)  # three intervals: a beat still running would have arrived
        assert len(receiver.requests) == at_stop
        assert receiver.rejected == 0  # every beat signed
        assert _heartbeats(receiver, "/hook") == []  # pages only; nothing was queued
        for beat in _heartbeats(receiver, "/am"):
            jsonschema.validate(beat.json, ALERTMANAGER)
        assert all(b.json["schema"] == HEARTBEAT_SCHEMA for b in _heartbeats(receiver, "/ping"))
        assert len(_heartbeats(receiver, "/am")) >= 3


def test_the_dispatcher_holds_beats_once_it_has_not_read_the_outbox_lately(
    engine: Engine,
) -> None:
    settings = _settings(_dest("am", type="alertmanager"), watchdog_interval_s=5)
    dispatcher = Dispatcher(engine, settings)
    dispatcher._polled_at = time.monotonic()
    assert dispatcher._healthy()
    config = settings.notify
    dispatcher._polled_at = time.monotonic() - (5 + config.timeout_s + 1)
    assert not dispatcher._healthy()
    assert Dispatcher(engine, _settings(_dest("slack", type="slack"))).watchdog is None
    registry = CollectorRegistry()  # the worker's: each dispatcher of it counts there
    for _ in range(2):
        counted = Dispatcher(engine, settings, registry=registry).watchdog
        assert counted is not None
        counted._count("am", "sent")
    sent = {"destination": "am", "outcome": "sent"}
    assert registry.get_sample_value("genmon_watchdog_heartbeats_total", sent) == 2


# --- a real worker -------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_a_role_worker_beats_at_its_interval_and_stops_when_the_worker_stops(
    kafka_settings: Settings, unique_name: str, free_port: Callable[[], int], tmp_path: Path
) -> None:
    """The acceptance: the watchdog reaches the local receiver at its interval (1 s here),
    and SIGTERM to `genmon worker --role incidents` stops it."""
    interval_s = 1.0
    bootstrap = kafka_settings.kafka.bootstrap_servers
    url = sqlite_url(tmp_path)
    migrated_engine(url).dispose()
    with WebhookReceiver(secret=SECRET) as receiver:
        base = f"http://{receiver.host}:{receiver.port}"
        destinations = tmp_path / "destinations.yaml"
        am = {"name": "am", "type": "alertmanager", "url": f"{base}/am", "secret": SECRET}
        hook = {"name": "hook", "url": f"{base}/hook", "heartbeat_url": f"{base}/ping"}
        hook["secret"] = SECRET
        destinations.write_text(yaml.safe_dump({"destinations": [am, hook]}))
        env = {
            **os.environ,
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
            "GENMON_DATABASE__URL": url,
            "GENMON_NOTIFY__DESTINATIONS_FILE": str(destinations),
            "GENMON_NOTIFY__WATCHDOG_INTERVAL_S": str(interval_s),
            "GENMON_INCIDENTS__RUN_IN_WORKER": "false",
            "GENMON_WORKER__WEB_PORT": str(free_port()),
            "GENMON_HOME": str(tmp_path / "home"),
        }
        prefixed = kafka_settings.model_copy(
            update={"kafka": kafka_settings.kafka.model_copy(update={"topic_prefix": unique_name})}
        )
        KafkaBroker(prefixed).ensure_topics(bootstrap)
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [GENMON, "worker", "--role", "incidents", "--loglevel", "warning"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 120
            while len(_heartbeats(receiver, "/am")) < 6 and time.monotonic() < deadline:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
            beats = _heartbeats(receiver, "/am")
            assert len(beats) >= 6, log_path.read_text()[-3000:]
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        at_stop = len(receiver.requests)
        time.sleep(3 * interval_s)
        assert len(receiver.requests) == at_stop, "heartbeats went on after the worker stopped"
    assert receiver.rejected == 0  # every beat signed with the destination's secret
    for beat in beats:
        jsonschema.validate(beat.json, ALERTMANAGER)
        assert beat.json["alerts"][0]["labels"]["deployment"] == unique_name
    gaps = sorted(b.received_at - a.received_at for a, b in itertools.pairwise(beats))
    median = gaps[len(gaps) // 2]
    # "At its interval": the beats are paced by it, measured with a wide margin for a
    # shared machine (a beat every 0.5-2 s when asked for one a second).
    assert 0.5 * interval_s <= median <= 2 * interval_s, gaps
    pings = _heartbeats(receiver, "/ping")
    assert len(pings) >= len(beats) - 1
