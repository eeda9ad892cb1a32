"""Signed webhook deliveries (the Standard Webhooks scheme), and their verification.

genmon signs each webhook delivery as https://www.standardwebhooks.com specifies, so any
Standard Webhooks library verifies it, and sends three headers:

- ``webhook-id``: the delivery's id, the notification's idempotency key (the same value
  as the ``Idempotency-Key`` header and the body's ``idempotency_key``): a resend after a
  crash carries the same id;
- ``webhook-timestamp``: Unix seconds when the request was signed;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``
  (several space-separated while a secret is rotated; one matching is enough).

The id and the timestamp are inside the signature, so a captured page cannot be replayed
under a new id (it would pass as a new page) nor, beyond the tolerance
(``notify.signature_tolerance_s``, default 300 s), at a new time. A receiver verifies
over the *raw* body bytes, then drops an id it has already accepted: that absorbs genmon's
at-least-once resends. The signing key is the secret's UTF-8 bytes, or for a secret
written ``whsec_<base64>`` (the form Standard Webhooks tools generate) those decoded bytes.

>>> body = b'{"event": "trigger"}'
>>> headers = signed_headers("s3cret", "k1", body, timestamp=1_700_000_000)
>>> verify_signature("s3cret", headers, body, tolerance=300, now=1_700_000_100)
True
>>> verify_signature("s3cret", {**headers, ID_HEADER: "k2"}, body, now=1_700_000_100)
False
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from pydantic import SecretStr

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SCHEME = "v1"
#: The prefix of secrets given as base64 (Standard Webhooks' ``whsec_`` form).
BASE64_SECRET_PREFIX = "whsec_"

Secret = str | bytes | SecretStr


def signing_key(secret: Secret) -> bytes:
    """The HMAC key of ``secret``: ``whsec_<base64>`` decoded, else its UTF-8 bytes."""
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if isinstance(secret, bytes):
        return secret
    if secret.startswith(BASE64_SECRET_PREFIX):
        try:
            return base64.b64decode(secret.removeprefix(BASE64_SECRET_PREFIX), validate=True)
        except binascii.Error:
            pass  # not base64 after all: the whole string is the key
    return secret.encode()


def sign(secret: Secret, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``v1,<base64>`` signature of delivery ``msg_id`` of ``body`` at ``timestamp``."""
    message = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return f"{SCHEME},{base64.b64encode(digest).decode()}"


def signed_headers(
    secret: Secret, msg_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers of a
    delivery of ``body`` (timestamp: now)."""
    stamp = int(time.time()) if timestamp is None else int(timestamp)
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(secret, msg_id, stamp, body),
    }


def verify_signature(
    secret: Secret,
    headers: Mapping[str, object],
    body: bytes,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``headers`` (names in any case) sign ``body`` with ``secret`` at a fresh time.

    False (never an exception) for a missing or malformed header, a timestamp more than
    ``tolerance`` seconds away from ``now`` (default: the clock), or no matching signature.
    """
    found = {str(name).lower(): value for name, value in headers.items()}
    msg_id, timestamp, signatures = (
        found.get(name) for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    )
    if not msg_id or timestamp is None or not isinstance(signatures, str):
        return False
    try:
        stamp = int(str(timestamp))
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance:
        return False
    expected = sign(secret, str(msg_id), stamp, body)
    # compare_digest on every candidate keeps the timing independent of which matched.
    results = [hmac.compare_digest(expected, candidate) for candidate in signatures.split()]
    return any(results)
