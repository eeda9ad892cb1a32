"""Signed deliveries (Standard Webhooks): genmon signs ``id.timestamp.body``, a real
receiver on loopback verifies, rejects forgeries and replays, and drops duplicates by the
signed id."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from incident_support import FakeClock, finding, migrated_engine, settings_with, sqlite_url, webhook
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from genmon.incidents.destinations import IDEMPOTENCY_HEADER
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.incidents.signing import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    signed_headers,
    signing_key,
    verify_signature,
)
from genmon.schemas.incidents import Notification, NotificationStatus

SECRET = "whsec-test-secret"
BODY = b'{"event":"trigger","incident":{"id":"abc"}}'
MSG_ID = "inc-1.7.trigger.hook"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = migrated_engine(sqlite_url(tmp_path))
    yield engine
    engine.dispose()


def _standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks v1 signature, computed here from the spec, not by genmon."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_known_answer_vectors_of_the_standard_webhooks_scheme() -> None:
    now = 1_700_000_000
    # A plain secret signs with its UTF-8 bytes; a ``whsec_`` secret with its base64 body.
    assert sign(SECRET, MSG_ID, now, BODY) == _standard_webhooks_signature(
        SECRET.encode(), MSG_ID, now, BODY
    )
    raw = bytes(range(24))
    whsec = "whsec_" + base64.b64encode(raw).decode()
    assert signing_key(whsec) == raw
    assert sign(whsec, MSG_ID, now, BODY) == _standard_webhooks_signature(raw, MSG_ID, now, BODY)
    headers = signed_headers(SECRET, MSG_ID, BODY, timestamp=now)
    assert headers == {
        ID_HEADER: MSG_ID,
        TIMESTAMP_HEADER: str(now),
        SIGNATURE_HEADER: _standard_webhooks_signature(SECRET.encode(), MSG_ID, now, BODY),
    }


def test_signed_delivery_is_verified_by_the_receiver(engine: Engine) -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        settings = settings_with(webhook("hook", receiver.url, secret=SECRET))
        clock = FakeClock()
        IncidentManager(engine, settings, clock=clock).process(finding(0))
        report = asyncio.run(Dispatcher(engine, settings, clock=clock).drain(timeout_s=10))
    assert report.delivered == 1 and receiver.rejected == 0
    (received,) = receiver.requests
    headers = received.headers
    # The signed delivery id is the notification's idempotency key, in the body too.
    assert headers[ID_HEADER] == headers[IDEMPOTENCY_HEADER.lower()]
    assert headers[ID_HEADER] == received.json["idempotency_key"]
    assert headers[SIGNATURE_HEADER] == _standard_webhooks_signature(
        SECRET.encode(), headers[ID_HEADER], int(headers[TIMESTAMP_HEADER]), received.body
    )
    assert verify_signature(SECRET, headers, received.body)


def test_a_captured_page_replayed_under_new_ids_is_rejected_and_a_resend_is_dropped() -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        captured = {**signed_headers(SECRET, MSG_ID, BODY), IDEMPOTENCY_HEADER: MSG_ID}
        assert httpx.post(receiver.url, content=BODY, headers=captured).status_code == 200
        for n in range(3):
            replay = {**captured, ID_HEADER: f"new-{n}", IDEMPOTENCY_HEADER: f"new-{n}"}
            assert httpx.post(receiver.url, content=BODY, headers=replay).status_code == 401
        # A genuine resend (same signed id, signed again later) is accepted and dropped.
        resend = {**signed_headers(SECRET, MSG_ID, BODY), IDEMPOTENCY_HEADER: "ignored"}
        assert httpx.post(receiver.url, content=BODY, headers=resend).status_code == 200
    assert receiver.rejected == 3
    assert list(receiver.unique) == [MSG_ID] and receiver.duplicates == 1


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
        good = signed_headers(SECRET, MSG_ID, BODY)
        assert httpx.post(receiver.url, content=BODY, headers=good).status_code == 200
        tampered = BODY.replace(b"trigger", b"resolve")
        assert httpx.post(receiver.url, content=tampered, headers=good).status_code == 401
        # Well past the window: int() and the request's own latency move a live clock by up
        # to a second or more (the exact edge is test_verify_signature_edge_cases' job).
        for skew in (-330, 330):
            stale = signed_headers(SECRET, MSG_ID, BODY, timestamp=int(time.time()) + skew)
            assert httpx.post(receiver.url, content=BODY, headers=stale).status_code == 401
        assert httpx.post(receiver.url, content=BODY).status_code == 401  # unsigned
    assert receiver.rejected == 4 and len(receiver.requests) == 1


def test_verify_signature_edge_cases() -> None:
    now = 1_700_000_000

    def headers(msg_id: str = MSG_ID, stamp: object = now, signature: object = None) -> dict:
        signed = sign(SECRET, MSG_ID, now, BODY) if signature is None else signature
        return {ID_HEADER: msg_id, TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signed}

    assert verify_signature(SECRET, headers(), BODY, 300, now=now + 300)
    assert not verify_signature(SECRET, headers(), BODY, 300, now=now + 301)
    assert verify_signature(SecretStr(SECRET), headers(), BODY, 300, now=now)
    assert verify_signature(SECRET.encode(), headers(), BODY, 300, now=now)
    # Header names are case-insensitive, as HTTP's are.
    upper = {name.upper(): value for name, value in headers().items()}
    assert verify_signature(SECRET, upper, BODY, 300, now=now)
    # During a key rotation the header carries several signatures, space-separated.
    rotated = f"{sign('old-secret', MSG_ID, now, BODY)} {sign(SECRET, MSG_ID, now, BODY)}"
    assert verify_signature(SECRET, headers(signature=rotated), BODY, 300, now=now)
    old = sign("old-secret", MSG_ID, now, BODY)
    assert not verify_signature(SECRET, headers(signature=old), BODY, 300, now=now)
    # The id and the timestamp are signed: changing either invalidates the signature.
    assert not verify_signature(SECRET, headers(msg_id="other"), BODY, 300, now=now)
    assert not verify_signature(SECRET, headers(stamp=now + 1), BODY, 300, now=now)
    for bad_stamp in (None, "", "soon"):
        assert not verify_signature(SECRET, headers(stamp=bad_stamp), BODY, 300, now=now)
    good = sign(SECRET, MSG_ID, now, BODY)
    for bad in ("", "v1,", good.replace("v1,", "v0,"), good.replace("v1,", "v1=")):
        assert not verify_signature(SECRET, headers(signature=bad), BODY, 300, now=now)
    assert not verify_signature(SECRET, {}, BODY, 300, now=now)
