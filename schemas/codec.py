"""Bytes <-> events: strict decoding with machine-readable rejection reasons.

Shared by the producer SDK (which validates before sending) and the ingest agents
(which validate what actually arrived). No Kafka or Faust imports here.

Reason codes of a rejected message (``SchemaError.reason`` and ``DeadLetter.reason``):

========================  ==================================================================
``empty_payload``         no bytes at all, or only whitespace
``oversized``             the message is larger than ``MAX_EVENT_BYTES``, or a field is
                          longer than its limit (prompt, ids, attributes, ...)
``not_utf8``              the bytes are not UTF-8 text
``bad_json``              UTF-8 text that is not JSON
``not_an_object``         JSON whose top level is not an object (a list, string, number, null)
``unknown_schema_version`` ``schema_version`` is not one this reader knows
``missing_field``         a required field is absent
``wrong_type``            a field has the wrong JSON type or cannot be parsed as its type
``unknown_field``         a field this schema version does not define
``invalid_value``         right type, but outside its allowed values (negative latency,
                          unknown enum member, naive timestamp, finished before started, ...)
========================  ==================================================================

When several fields are wrong, the reason of the most fundamental problem wins
(the order of the table above), and the error text lists every problem.

NUL and lone surrogates (text PostgreSQL cannot store) are decided by the event schemas:
refused in identifiers (``invalid_value``, naming the field), replaced by U+FFFD in free
text (see :mod:`genmon.schemas.events`). A lone surrogate escape (``"\\ud800"`` without its
pair, as JavaScript's ``JSON.stringify`` writes a string cut inside an emoji) is JSON the
parser refuses, so :func:`decode` reads such a message again with each one as ``\\u0000``,
which the schemas then decide the same way.

>>> from genmon.schemas.events import InferenceEvent
>>> try:
...     decode(b'{"model_id": "chat", "latency_ms": "fast"}', InferenceEvent)
... except SchemaError as exc:
...     print(exc.reason)
wrong_type
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from genmon.exceptions import SchemaError
from genmon.schemas.events import (
    LONE_SURROGATES,
    MAX_EVENT_BYTES,
    MAY_HOLD_NUL,
    SANITIZED,
    DeadLetter,
    storable_text,
)

#: Kafka header naming the producing ``genmon.Monitor`` instance (a uuid hex string).
HEADER_PRODUCER: Final = "genmon-producer"
#: Kafka header with the producer's per-(topic, model) sequence number, ASCII decimal.
HEADER_SEQ: Final = "genmon-seq"

EMPTY_PAYLOAD: Final = "empty_payload"
OVERSIZED: Final = "oversized"
NOT_UTF8: Final = "not_utf8"
BAD_JSON: Final = "bad_json"
NOT_AN_OBJECT: Final = "not_an_object"
UNKNOWN_SCHEMA_VERSION: Final = "unknown_schema_version"
MISSING_FIELD: Final = "missing_field"
WRONG_TYPE: Final = "wrong_type"
UNKNOWN_FIELD: Final = "unknown_field"
INVALID_VALUE: Final = "invalid_value"

#: Every reason code, most fundamental first.
REASONS: Final = (
    EMPTY_PAYLOAD,
    OVERSIZED,
    NOT_UTF8,
    BAD_JSON,
    NOT_AN_OBJECT,
    UNKNOWN_SCHEMA_VERSION,
    MISSING_FIELD,
    WRONG_TYPE,
    UNKNOWN_FIELD,
    INVALID_VALUE,
)
_PRIORITY = {reason: rank for rank, reason in enumerate(REASONS)}

_TOO_LONG = frozenset({"string_too_long", "too_long", "bytes_too_long"})
_MAX_ERROR_CHARS = 2000

#: One backslash escape of a JSON string: a surrogate pair, a lone surrogate, or any other.
_ESCAPE = re.compile(
    rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
    rb"|u[dD][c-fC-F][0-9a-fA-F]{2}|.)",
    re.DOTALL,
)

_NUL_ESCAPE: Final = b"\\u0000"

M = TypeVar("M", bound=BaseModel)


def decode(
    raw: bytes | None,
    model: type[M],
    *,
    max_bytes: int = MAX_EVENT_BYTES,
    sanitized: list[str] | None = None,
) -> M:
    """Parse ``raw`` JSON bytes as ``model``; raise :class:`SchemaError` with a reason code.

    ``sanitized``, when given, receives the name of each free-text field of the accepted
    event whose NUL or lone surrogates were replaced (nothing when the message is refused).
    """
    if not raw or raw.isspace():
        raise SchemaError("the message has no payload; send a JSON object", EMPTY_PAYLOAD)
    if len(raw) > max_bytes:
        raise SchemaError(
            f"the message is {len(raw)} bytes, more than the {max_bytes} accepted; "
            "shorten prompt/response or metadata",
            OVERSIZED,
        )
    notes: list[str] = []
    try:
        event = _validate(raw, model, notes)
    except ValidationError as exc:
        reason, text = classify(exc, raw)
        raise SchemaError(text, reason) from None
    if sanitized is not None:
        sanitized += notes
    return event


def _validate(raw: bytes, model: type[M], notes: list[str]) -> M:
    """``model_validate_json``, reading lone surrogate escapes as NUL when they are why the
    JSON was refused."""
    # NUL can only be written \\u0000 in JSON (a raw one is refused): without it, the
    # schemas skip their checks for unstorable text.
    context = {SANITIZED: notes, MAY_HOLD_NUL: _NUL_ESCAPE in raw}
    try:
        return model.model_validate_json(raw, context=context)
    except ValidationError as exc:
        if not any(error["type"] == "json_invalid" for error in exc.errors()):
            raise
        readable = lone_surrogates_as_nul(raw)
        if readable is None:
            raise
    del notes[:]
    context = {SANITIZED: notes, MAY_HOLD_NUL: True, LONE_SURROGATES: True}
    return model.model_validate_json(readable, context=context)


def lone_surrogates_as_nul(raw: bytes) -> bytes | None:
    """``raw`` with each lone surrogate escape of its JSON strings written ``\\u0000`` (same
    length), or ``None`` when it has none.

    >>> lone_surrogates_as_nul(rb'{"a": "\\ud83d\\ude00 \\ud83d \\\\ud800"}')
    b'{"a": "\\\\ud83d\\\\ude00 \\\\u0000 \\\\\\\\ud800"}'
    """
    if b"\\u" not in raw:
        return None
    rewritten = _ESCAPE.sub(_nul_if_lone, raw)
    return None if rewritten == raw else rewritten


def _nul_if_lone(match: re.Match[bytes]) -> bytes:
    escape = match.group()
    # Only a surrogate without its pair is 6 bytes: a pair is 12, any other escape 2.
    return b"\\u0000" if len(escape) == 6 else escape


def classify(exc: ValidationError, raw: bytes | None = None) -> tuple[str, str]:
    """Reason code and a bounded human-readable text for a pydantic validation error."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    reasons = [_reason_of(error, raw) for error in errors] or [INVALID_VALUE]
    reason = min(reasons, key=_PRIORITY.__getitem__)
    return reason, _describe(errors)[:_MAX_ERROR_CHARS]


def _reason_of(error: Any, raw: bytes | None) -> str:
    kind: str = error["type"]
    loc: tuple[Any, ...] = tuple(error["loc"])
    if kind == "json_invalid":
        return BAD_JSON if raw is None or _is_utf8(raw) else NOT_UTF8
    if kind in {"model_type", "model_attributes_type", "dict_type"} and not loc:
        return NOT_AN_OBJECT
    if loc[:1] == ("schema_version",):
        return MISSING_FIELD if kind == "missing" else UNKNOWN_SCHEMA_VERSION
    if kind == "missing":
        return MISSING_FIELD
    if kind == "extra_forbidden":
        return UNKNOWN_FIELD
    if kind in _TOO_LONG:
        return OVERSIZED
    if kind.endswith(("_type", "_parsing")) or kind == "model_type":
        return WRONG_TYPE
    return INVALID_VALUE


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _describe(errors: Iterable[Any]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"]) or "<message>"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def encode(event: BaseModel) -> bytes:
    """The wire form of ``event``: compact UTF-8 JSON."""
    return event.model_dump_json().encode()


def dead_letter(
    raw: bytes | None,
    *,
    reason: str,
    error: str,
    source_topic: str,
    partition: int,
    offset: int,
    max_payload_bytes: int,
) -> DeadLetter:
    """The dead-letter record for a rejected message, keeping at most ``max_payload_bytes``."""
    payload = raw or b""
    kept = payload[:max_payload_bytes]
    return DeadLetter(
        reason=reason,
        # The error quotes field names (and dict keys), which may hold what it refuses.
        error=storable_text(error[:_MAX_ERROR_CHARS]),
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        payload_b64=base64.b64encode(kept).decode("ascii"),
        payload_size=len(payload),
        payload_truncated=len(kept) < len(payload),
    )
