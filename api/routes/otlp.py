"""OTLP/HTTP trace ingest: ``POST /v1/traces`` (scope ``ingest``).

Point an OpenTelemetry exporter at ``http://<api>/v1/traces`` with the header
``Authorization: Bearer gm_...``: its GenAI spans become inference events on the SDK's
topic (:mod:`genmon.api.otlp_mapping` says which spans and how). Both OTLP/HTTP encodings
are read, ``application/x-protobuf`` and ``application/json`` (ids in hex), gzip or not;
the answer is an ``ExportTraceServiceResponse`` in the request's encoding, whose
``partial_success`` counts the spans that were not GenAI model calls or not valid
inferences, with a message naming them. Valid spans are sent even when others are not.

As OTLP asks: 200 when the broker acknowledged every inference (within
``api.ingest_timeout_s``), 503 otherwise (exporters retry it), 400 for a body that is not
an export request, 413 over ``api.max_body_bytes`` (decompressed too) or with more model
calls than ``api.max_batch_events``, 415 for another content type.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from pydantic import BaseModel

from genmon.api.auth import require
from genmon.api.ingest_events import validate_one
from genmon.api.metrics import metrics_of
from genmon.api.otlp_mapping import NotAnInference, attributes, inference_fields
from genmon.api.payloads import Problem
from genmon.api.producer import producer_of
from genmon.api.routes.ingest import BodyTooLarge, read_body
from genmon.api.tokens import Caller
from genmon.schemas.access import Scope

log = logging.getLogger(__name__)

router = APIRouter(tags=["ingest"])

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
#: Reasons of rejected spans named in one partial_success message, at most.
MAX_NAMED: Final = 10
_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")


class OtlpBadRequest(Exception):
    """The body is not an ExportTraceServiceRequest in the declared encoding."""


_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
            JSON: {
                "schema": {
                    "type": "object",
                    "description": "ExportTraceServiceRequest, OTLP JSON encoding",
                    "properties": {"resourceSpans": {"type": "array", "items": {"type": "object"}}},
                }
            },
        },
    }
}
_ANSWER: Final = {
    "content": {
        PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
        JSON: {
            "schema": {
                "type": "object",
                "description": "ExportTraceServiceResponse, OTLP JSON encoding",
                "properties": {"partialSuccess": {"type": "object"}},
            }
        },
    },
    "description": "every GenAI span written; partialSuccess counts and names the others",
}


@router.post(
    "/v1/traces",
    summary="OTLP/HTTP trace export: GenAI spans become inference events",
    response_class=Response,
    responses={
        200: _ANSWER,
        400: {"model": Problem, "description": "not an OTLP export request"},
        401: {"model": Problem, "description": "no token, or one unknown, revoked or expired"},
        403: {"model": Problem, "description": "the token lacks the ingest scope"},
        413: {"model": Problem, "description": "over api.max_body_bytes or max_batch_events"},
        415: {"model": Problem, "description": "neither protobuf nor JSON"},
        503: {"model": Problem, "description": "Kafka did not acknowledge every event in time"},
    },
    openapi_extra=_BODY,
)
async def post_traces(
    request: Request, caller: Annotated[Caller, Depends(require(Scope.INGEST))]
) -> Response:
    app = request.app
    settings = app.state.settings
    limit = settings.api.max_body_bytes
    encoding = _encoding(request)
    try:
        export = parse(await read_body(request, limit), encoding)
    except BodyTooLarge:
        raise HTTPException(413, f"the body is over {limit} bytes (api.max_body_bytes)") from None
    except OtlpBadRequest as exc:
        raise HTTPException(400, str(exc)) from None
    events, values, rejected = [], [], Rejections()
    for resource_spans in export.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                outcome = _inference(span, resource, settings.sdk.max_text_chars)
                if isinstance(outcome, Refusal):
                    rejected.add(span.span_id.hex(), outcome.reason, outcome.why)
                else:
                    events.append(outcome[0])
                    values.append(outcome[1])
    metrics = metrics_of(app)
    for reason, count in rejected.by_reason.items():
        metrics.ingest_refused.labels(kind="inference", reason=reason).inc(count)
    if len(events) > settings.api.max_batch_events:
        raise HTTPException(
            413,
            f"{len(events)} GenAI spans in one export, more than the "
            f"{settings.api.max_batch_events} accepted (api.max_batch_events): lower the "
            "exporter's max_export_batch_size",
        )
    delivery = await producer_of(app).send(
        "inference", events, values, settings.api.ingest_timeout_s
    )
    if delivery.acknowledged:
        metrics.ingest_accepted.labels(kind="inference", route="otlp").inc(delivery.acknowledged)
    if not delivery.complete:
        metrics.ingest_refused.labels(kind="inference", reason="unacknowledged").inc(
            delivery.failed
        )
        raise HTTPException(
            503,
            f"{delivery.failed} of {len(events)} spans were not acknowledged by Kafka within "
            f"{settings.api.ingest_timeout_s:g} s (api.ingest_timeout_s): {delivery.error}",
        )
    answer = ExportTraceServiceResponse()
    if rejected.count:
        answer.partial_success.rejected_spans = rejected.count
        answer.partial_success.error_message = rejected.message()
    if encoding == JSON:
        return Response(json.dumps(json_format.MessageToDict(answer)), media_type=JSON)
    return Response(answer.SerializeToString(), media_type=PROTOBUF)


class Rejections:
    """Spans not written: counted by reason, the first few named."""

    def __init__(self) -> None:
        self.count = 0
        self.by_reason: dict[str, int] = {}
        self.named: list[str] = []

    def add(self, span_id: str, reason: str, why: str) -> None:
        self.count += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.named) < MAX_NAMED:
            self.named.append(f"span {span_id or '?'}: {why}")

    def message(self) -> str:
        more = self.count - len(self.named)
        text = "; ".join(self.named) + (f"; and {more} more" if more else "")
        return f"{self.count} spans not written ({text})"[:4000]


@dataclass(frozen=True)
class Refusal:
    """Why a span is not written: a reason code (for /metrics) and a text (for the answer)."""

    reason: str
    why: str


def _inference(
    span: Any, resource: dict[str, Any], max_text_chars: int
) -> tuple[BaseModel, bytes] | Refusal:
    """The span's event and its bytes, or why it is rejected."""
    try:
        fields = inference_fields(span, resource)
    except NotAnInference as exc:
        return Refusal("not_genai", str(exc))
    except Exception as exc:  # a span shaped in a way nobody foresaw must not cost a 500
        log.warning("OTLP span %s could not be mapped: %r", span.span_id.hex(), exc)
        return Refusal("unmappable", f"could not be read as an inference ({exc!r})")
    outcome = validate_one("inference", 0, fields, max_text_chars)
    if isinstance(outcome, list):
        why = "; ".join(
            f"{'.'.join(map(str, error.loc)) or 'event'}: {error.message}" for error in outcome
        )
        return Refusal(outcome[0].reason, why)
    return outcome


def _encoding(request: Request) -> str:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in (PROTOBUF, "application/protobuf"):
        return PROTOBUF
    if media == JSON:
        return JSON
    raise HTTPException(
        415, f"content type {media or 'none'!r}: send {PROTOBUF} or {JSON} (OTLP/HTTP)"
    )


def parse(body: bytes, encoding: str) -> ExportTraceServiceRequest:
    """The export request of a body in ``encoding`` (OTLP JSON: ids as hex)."""
    export = ExportTraceServiceRequest()
    if encoding == PROTOBUF:
        try:
            export.ParseFromString(body)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise OtlpBadRequest(f"not an ExportTraceServiceRequest ({exc})") from None
        return export
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise OtlpBadRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OtlpBadRequest("the body must be an ExportTraceServiceRequest object")
    try:
        json_format.ParseDict(_ids_as_base64(data), export, ignore_unknown_fields=True)
    except Exception as exc:  # ParseError mostly; json_format raises others on odd input
        raise OtlpBadRequest(f"not an ExportTraceServiceRequest ({exc})") from None
    return export


def _ids_as_base64(node: Any) -> Any:
    """OTLP JSON writes trace and span ids as hex; protobuf's JSON reads bytes as base64."""
    if isinstance(node, list):
        return [_ids_as_base64(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _ID_FIELDS and isinstance(value, str):
            with contextlib.suppress(ValueError):  # not hex: the parser refuses it
                value = base64.b64encode(bytes.fromhex(value)).decode()
        out[key] = _ids_as_base64(value)
    return out
