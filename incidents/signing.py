"""HMAC-SHA256 signatures of webhook bodies, and their verification for receivers.

genmon signs ``f"{timestamp}.".encode() + body`` with the destination's secret and
sends two headers:

- ``X-Genmon-Timestamp``: Unix seconds when the request was signed;
- ``X-Genmon-Signature``: ``v1=<hex digest>`` (several comma-separated ``v1=`` values
  may appear while a secret is being rotated; one matching is enough).

Receivers must recompute the digest over the *raw* body bytes and reject a timestamp
further than the replay window (``notify.signature_tolerance_s``, default 300 s) from
their clock; a replayed request is then at most that old. Use the idempotency key to
drop a genuine request delivered twice within the window.

>>> body = b'{"event": "trigger"}'
>>> headers = signed_headers("s3cret", body, timestamp=1_700_000_000)
>>> verify_signature("s3cret", headers[TIMESTAMP_HEADER], body,
...                  headers[SIGNATURE_HEADER], tolerance=300, now=1_700_000_100)
True
>>> verify_signature("s3cret", headers[TIMESTAMP_HEADER], body + b" ",
...                  headers[SIGNATURE_HEADER], tolerance=300, now=1_700_000_100)
False
"""

from __future__ import annotations

import hashlib
import hmac
import time

from pydantic import SecretStr

TIMESTAMP_HEADER = "X-Genmon-Timestamp"
SIGNATURE_HEADER = "X-Genmon-Signature"
SCHEME = "v1"

Secret = str | bytes | SecretStr


def _key(secret: Secret) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: Secret, timestamp: int | str, body: bytes) -> str:
    """The ``v1=<hex>`` signature of ``body`` sent at ``timestamp``."""
    message = f"{int(timestamp)}.".encode() + body
    return f"{SCHEME}={hmac.new(_key(secret), message, hashlib.sha256).hexdigest()}"


def signed_headers(secret: Secret, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The timestamp and signature headers for ``body`` (timestamp: now)."""
    stamp = int(time.time()) if timestamp is None else int(timestamp)
    return {TIMESTAMP_HEADER: str(stamp), SIGNATURE_HEADER: sign(secret, stamp, body)}


def verify_signature(
    secret: Secret,
    timestamp: str | int | None,
    body: bytes,
    signature: str | None,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` is genmon's signature of ``body`` at a fresh ``timestamp``.

    False (never an exception) for a missing or malformed header, a timestamp more than
    ``tolerance`` seconds away from ``now`` (default: the clock), or a digest mismatch.
    """
    if timestamp is None or signature is None:
        return False
    try:
        stamp = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance:
        return False
    expected = sign(secret, stamp, body)
    candidates = [part.strip() for part in signature.split(",")]
    # compare_digest on every candidate keeps the timing independent of which matched.
    results = [hmac.compare_digest(expected, candidate) for candidate in candidates]
    return any(results)
