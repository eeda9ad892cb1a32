"""HMAC signatures: genmon signs, a real receiver on loopback verifies and rejects forgeries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from incident_support import FakeClock, finding, migrated_engine, settings_with, sqlite_url, webhook
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.incidents.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    signed_headers,
    verify_signature,
)
from genmon.schemas.incidents import Notification, NotificationStatus

SECRET = "whsec-test-secret"
BODY = b'{"event":"trigger","incident":{"id":"abc"}}'


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = migrated_engine(sqlite_url(tmp_path))
    yield engine
    engine.dispose()


def test_signed_delivery_is_verified_by_the_receiver(engine: Engine) -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        settings = settings_with(webhook("hook", receiver.url, secret=SECRET))
        clock = FakeClock()
        IncidentManager(engine, settings, clock=clock).process(finding(0))
        report = asyncio.run(Dispatcher(engine, settings, clock=clock).drain(timeout_s=10))
    assert report.delivered == 1 and receiver.rejected == 0
    (received,) = receiver.requests
    assert received.headers[SIGNATURE_HEADER.lower()].startswith("v1=")
    assert verify_signature(
        SECRET,
        received.headers[TIMESTAMP_HEADER.lower()],
        received.body,
        received.headers[SIGNATURE_HEADER.lower()],
    )


def test_receiver_with_another_secret_rejects_and_the_row_goes_dead(engine: Engine) -> None:
    with WebhookReceiver(secret="a-different-secret") as receiver:
        settings = settings_with(webhook("hook", receiver.url, secret=SECRET))
        clock = FakeClock()
        IncidentManager(engine, settings, clock=clock).process(finding(0))
        asyncio.run(Dispatcher(engine, settings, clock=clock).drain(timeout_s=10))
    assert receiver.rejected == 1 and receiver.requests == []
    with Session(engine) as session:
        row = session.exec(select(Notification)).one()
    assert row.status is NotificationStatus.DEAD and row.last_status_code == 401


def test_receiver_rejects_tampered_body_and_stale_or_future_timestamps() -> None:
    with WebhookReceiver(secret=SECRET, tolerance_s=300) as receiver:
        good = signed_headers(SECRET, BODY)
        assert httpx.post(receiver.url, content=BODY, headers=good).status_code == 200
        tampered = BODY.replace(b"trigger", b"resolve")
        assert httpx.post(receiver.url, content=tampered, headers=good).status_code == 401
        # Well past the window: int() and the request's own latency move a live clock by up
        # to a second or more (the exact edge is test_verify_signature_edge_cases' job).
        for skew in (-330, 330):
            stale = signed_headers(SECRET, BODY, timestamp=int(time.time()) + skew)
            assert httpx.post(receiver.url, content=BODY, headers=stale).status_code == 401
        assert httpx.post(receiver.url, content=BODY).status_code == 401  # unsigned
    assert receiver.rejected == 4 and len(receiver.requests) == 1


def test_verify_signature_edge_cases() -> None:
    now = 1_700_000_000
    signature = sign(SECRET, now, BODY)
    assert verify_signature(SECRET, str(now), BODY, signature, 300, now=now + 300)
    assert not verify_signature(SECRET, str(now), BODY, signature, 300, now=now + 301)
    assert verify_signature(SecretStr(SECRET), now, BODY, signature, 300, now=now)
    assert verify_signature(SECRET.encode(), now, BODY, signature, 300, now=now)
    # During a key rotation the header may carry several signatures; one must match.
    rotated = f"{sign('old-secret', now, BODY)}, {signature}"
    assert verify_signature(SECRET, now, BODY, rotated, 300, now=now)
    assert not verify_signature(SECRET, now, BODY, sign("old-secret", now, BODY), 300, now=now)
    # The timestamp is signed: moving it invalidates the signature.
    assert not verify_signature(SECRET, now + 1, BODY, signature, 300, now=now)
    for bad_timestamp in (None, "", "soon"):
        assert not verify_signature(SECRET, bad_timestamp, BODY, signature, 300, now=now)
    for bad_signature in (None, "", "v1=", signature.replace("v1=", "v0=")):
        assert not verify_signature(SECRET, now, BODY, bad_signature, 300, now=now)
