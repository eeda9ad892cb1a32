"""HTTP ingest: ``POST /v1/inferences`` and ``POST /v1/feedback`` (scope ``ingest``).

For services that cannot run the Python SDK. The body is one event, a JSON list of
events, or ``{"events": [...]}``, gzip or deflate compressed or not: at most
``api.max_batch_events`` events and ``api.max_body_bytes`` bytes (sent, chunked or
decompressed), else 413. Every event is validated as the SDK validates it
(:mod:`genmon.api.ingest_events`) before anything is sent: one invalid event refuses
the whole request with 422, each error naming the event and the field
(``events[3].latency_ms: ...``), and nothing of it reaches Kafka.

A valid request is written to the SDK's topics (:mod:`genmon.api.producer`) and answered
202 once the broker acknowledged every event, with the ids the events carry (generated
when not given: send feedback with the inference's ``request_id``). When the broker does
not acknowledge them within ``api.ingest_timeout_s``: 503, saying how many were written;
resending the request may then store some twice (they keep their ids).
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from genmon.api.auth import require
from genmon.api.ingest_events import MODELS, EventError, validate_all
from genmon.api.metrics import metrics_of
from genmon.api.payloads import Problem
from genmon.api.producer import IngestProducer, producer_of
from genmon.api.tokens import Caller
from genmon.schemas.access import Scope
from genmon.schemas.codec import BAD_JSON, NOT_AN_OBJECT

log = logging.getLogger(__name__)

router = APIRouter(tags=["ingest"])

IngestCaller = Annotated[Caller, Depends(require(Scope.INGEST))]
#: How many event errors a 422 lists (the rest are counted in its last entry).
MAX_LISTED_ERRORS: Final = 50
#: How long shutdown waits for the producer to deliver what is in flight.
CLOSE_TIMEOUT_S: Final = 10.0


class IngestAccepted(BaseModel):
    """Events the broker acknowledged."""

    accepted: int = Field(description="events written to Kafka")
    ids: list[str] = Field(
        description="each event's request_id (inferences) or feedback_id (feedback), in order"
    )


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str = Field(description="the codec's reason code (missing_field, wrong_type, ...)")


class IngestInvalid(BaseModel):
    """Nothing of the request was sent: every listed event must be fixed."""

    detail: list[FieldError]


class BodyTooLarge(Exception):
    """A chunked or compressed body that grew over ``api.max_body_bytes``."""


async def on_startup(app: FastAPI) -> None:
    app.state.ingest_producer = IngestProducer(app.state.settings)


async def on_shutdown(app: FastAPI) -> None:
    producer: IngestProducer | None = getattr(app.state, "ingest_producer", None)
    if producer is not None:
        await producer.close(CLOSE_TIMEOUT_S)


def body_schema(kind: str) -> dict[str, Any]:
    """The OpenAPI request body: an event, a list of events, or ``{"events": [...]}``."""
    event = inline_refs(MODELS[kind].model_json_schema())
    many = {"type": "array", "items": event}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            event,
                            many,
                            {
                                "type": "object",
                                "properties": {"events": many},
                                "required": ["events"],
                                "additionalProperties": False,
                            },
                        ]
                    }
                }
            },
        }
    }


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place (OpenAPI resolves ``#`` to itself)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk({**defs[ref.removeprefix("#/$defs/")], **{
                    k: v for k, v in node.items() if k != "$ref"
                }})  # fmt: skip
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": Problem, "description": "a compressed body that cannot be decompressed"},
    401: {"model": Problem, "description": "no token, or one unknown, revoked or expired"},
    403: {"model": Problem, "description": "the token lacks the ingest scope"},
    413: {"model": Problem, "description": "too many events, or a body over api.max_body_bytes"},
    422: {"model": IngestInvalid, "description": "invalid events, each named; none was sent"},
    415: {"model": Problem, "description": "a content encoding other than gzip or deflate"},
    503: {"model": Problem, "description": "Kafka did not acknowledge every event in time"},
}


@router.post(
    "/v1/inferences",
    status_code=202,
    response_model=IngestAccepted,
    summary="Log inferences (one, a list, or {events: [...]})",
    responses=RESPONSES,
    openapi_extra=body_schema("inference"),
)
async def post_inferences(request: Request, caller: IngestCaller) -> Any:
    return await ingest(request, "inference")


@router.post(
    "/v1/feedback",
    status_code=202,
    response_model=IngestAccepted,
    summary="Log feedback (one, a list, or {events: [...]})",
    responses=RESPONSES,
    openapi_extra=body_schema("feedback"),
)
async def post_feedback(request: Request, caller: IngestCaller) -> Any:
    return await ingest(request, "feedback")


async def ingest(request: Request, kind: str) -> Any:
    """Read, validate all, then send all; see the module docstring."""
    app = request.app
    settings = app.state.settings
    metrics = metrics_of(app)
    refused = metrics.ingest_refused
    try:
        body = await read_body(request, settings.api.max_body_bytes)
    except BodyTooLarge:
        refused.labels(kind=kind, reason="body_too_large").inc()
        raise HTTPException(
            413,
            f"the request body is over the limit of {settings.api.max_body_bytes} bytes "
            "(api.max_body_bytes): send smaller batches",
        ) from None
    items, problem = events_in(body)
    if problem is not None:
        refused.labels(kind=kind, reason=problem.reason).inc()
        return invalid([problem])
    limit = settings.api.max_batch_events
    if len(items) > limit:
        refused.labels(kind=kind, reason="too_many_events").inc(len(items))
        raise HTTPException(
            413,
            f"{len(items)} events in one request, more than the {limit} accepted "
            "(api.max_batch_events): split the batch",
        )
    events, values, errors = validate_all(kind, items, settings.sdk.max_text_chars)
    if errors:
        first_reasons = {error.index: error.reason for error in reversed(errors)}
        for reason in first_reasons.values():
            refused.labels(kind=kind, reason=reason).inc()
        withheld = len(items) - len(first_reasons)
        if withheld:
            refused.labels(kind=kind, reason="batch_refused").inc(withheld)
        return invalid(errors)
    delivery = await producer_of(app).send(kind, events, values, settings.api.ingest_timeout_s)
    if delivery.acknowledged:
        metrics.ingest_accepted.labels(kind=kind, route="json").inc(delivery.acknowledged)
    if not delivery.complete:
        refused.labels(kind=kind, reason="unacknowledged").inc(delivery.failed)
        raise HTTPException(
            503,
            f"{delivery.failed} of {len(events)} events were not acknowledged by Kafka within "
            f"{settings.api.ingest_timeout_s:g} s (api.ingest_timeout_s): {delivery.error}; "
            f"{delivery.acknowledged} were written. Is the broker up (`genmon infra status`)? "
            "Resend the request: events keep their ids, so repeats can be recognised",
        )
    id_field = "request_id" if kind == "inference" else "feedback_id"
    return IngestAccepted(
        accepted=delivery.acknowledged, ids=[getattr(event, id_field) for event in events]
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, decompressed (``Content-Encoding`` gzip or deflate), refusing one over
    ``limit`` bytes as sent or as decompressed (a declared Content-Length over it was
    already refused by the app's middleware)."""
    if request.headers.get("content-length", "").isdigit():
        raw = await request.body()
    else:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        raw = b"".join(chunks)
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding in ("", "identity"):
        return raw
    if coding not in ("gzip", "deflate"):
        raise HTTPException(415, f"content encoding {coding!r}: send gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise HTTPException(400, f"the {coding} body cannot be decompressed ({exc})") from None
    if len(body) > limit:
        raise BodyTooLarge
    return body


def events_in(body: bytes) -> tuple[list[Any], EventError | None]:
    """The event objects of a body (one, a list, or ``{"events": [...]}``), or why not."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [], body_error(f"the body is not JSON ({exc})", BAD_JSON)
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and set(data) == {"events"}:
        if isinstance(data["events"], list):
            return data["events"], None
        return [], body_error("events must be a list of event objects", NOT_AN_OBJECT)
    if isinstance(data, dict):
        return [data], None
    return [], body_error(
        'send an event object, a list of them, or {"events": [...]}', NOT_AN_OBJECT
    )


def body_error(message: str, reason: str) -> EventError:
    return EventError(-1, (), message, reason)


def invalid(errors: list[EventError]) -> JSONResponse:
    """422 listing the errors (at most :data:`MAX_LISTED_ERRORS`, then how many more)."""
    detail = [
        {"loc": ["body"], "msg": f"body: {e.message}", "type": e.reason}
        if e.index < 0
        else e.as_detail()
        for e in errors[:MAX_LISTED_ERRORS]
    ]
    if len(errors) > MAX_LISTED_ERRORS:
        more = len(errors) - MAX_LISTED_ERRORS
        detail.append({"loc": ["body"], "msg": f"and {more} more errors", "type": "more"})
    return JSONResponse(status_code=422, content={"detail": detail})
