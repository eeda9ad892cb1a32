"""OTLP/HTTP trace ingest (`POST /v1/traces`): spans exported by the OpenTelemetry SDK with
GenAI attributes (OTel GenAI conventions, OpenLLMetry, OpenInference) arrive on the
inference topic as inference events; other spans are counted in ``partial_success``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_ingest_support import end_offsets, running_api, topic_settings
from kafka_support import consume
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from genmon.api.otlp_mapping import inference_fields
from genmon.schemas.events import InferenceEvent
from genmon.settings import Settings

pytestmark = [pytest.mark.kafka]

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z in ns


def _spans() -> list[Any]:
    """Five model calls in four dialects, one HTTP span, one call that ends before it began."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "support-bot", "service.version": "1.4"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")

    def span(name: str, attrs: dict[str, Any], ms: float, offset: int = 0) -> Any:
        started = T0 + offset * 1_000_000_000
        return tracer.start_span(name, attributes=attrs, start_time=started), started + int(
            ms * 1e6
        )

    semconv, end = span(
        "chat gpt-4o",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.usage.input_tokens": 12,
            "gen_ai.usage.output_tokens": 34,
            "gen_ai.response.finish_reasons": ["stop"],
            "gen_ai.input.messages": json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": "Where is my card?"}]}]
            ),
            "gen_ai.system_instructions": json.dumps([{"type": "text", "content": "Be brief."}]),
            "gen_ai.output.messages": json.dumps(
                [
                    {
                        "role": "assistant",
                        "parts": [{"type": "text", "content": "It ships tomorrow."}],
                        "finish_reason": "stop",
                    }
                ]
            ),
            "genmon.segment.locale": "de",
        },
        ms=842.5,
    )
    semconv.end(end_time=end)
    openllmetry, end = span(
        "openai.chat",
        {
            "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.prompt_tokens": 5,
            "gen_ai.usage.completion_tokens": 7,
            "gen_ai.prompt.0.role": "system",
            "gen_ai.prompt.0.content": "You help.",
            "gen_ai.prompt.1.role": "user",
            "gen_ai.prompt.1.content": "Reset my PIN",
            "gen_ai.completion.0.role": "assistant",
            "gen_ai.completion.0.content": "Open the app, then Settings.",
        },
        ms=120,
        offset=1,
    )
    openllmetry.end(end_time=end)
    openinference, end = span(
        "ChatCompletion",
        {
            "openinference.span.kind": "LLM",
            "genmon.model_id": "phoenix-bot",
            "llm.model_name": "claude-3-5-sonnet",
            "llm.token_count.prompt": 9,
            "llm.token_count.completion": 3,
            "llm.input_messages.0.message.role": "user",
            "llm.input_messages.0.message.content": "Is it raining?",
            "llm.output_messages.0.message.role": "assistant",
            "llm.output_messages.0.message.content": "No.",
            "input.value": "Is it raining?",
            "output.value": "No.",
        },
        ms=55,
        offset=2,
    )
    openinference.end(end_time=end)
    events, end = span("text_completion", {"gen_ai.request.model": "legacy-1"}, ms=10, offset=3)
    events.add_event("gen_ai.content.prompt", {"gen_ai.prompt": "Say hi"}, timestamp=end)
    events.add_event("gen_ai.content.completion", {"gen_ai.completion": "hi"}, timestamp=end)
    events.set_attribute("error.type", "rate_limited")
    events.set_status(Status(StatusCode.ERROR, "429"))
    events.end(end_time=end)
    http, end = span("GET /health", {"http.request.method": "GET"}, ms=1, offset=4)
    http.end(end_time=end)
    backwards, _ = span("chat", {"gen_ai.request.model": "gpt-4o"}, ms=0, offset=5)
    backwards.end(end_time=T0)
    provider.shutdown()
    return list(memory.get_finished_spans())


def _by_span_name(records: list[Any]) -> dict[str, InferenceEvent]:
    events = [InferenceEvent.model_validate_json(record.value) for record in records]
    return {event.metadata["span_name"]: event for event in events}


def test_spans_exported_by_the_opentelemetry_sdk_arrive_as_inference_events(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    settings = topic_settings(kafka_settings, unique_name)
    spans = _spans()
    with running_api(settings, tmp_path, free_port()) as api:
        exporter = OTLPSpanExporter(
            endpoint=f"{api.url}/v1/traces", headers=api.headers, compression=Compression.Gzip
        )
        try:
            assert exporter.export(spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        # The same export by hand, to read the answer: 2 spans rejected, named.
        before = end_offsets(settings, "inference")
        reply = httpx.post(
            f"{api.url}/v1/traces",
            content=_encoded(spans[4:]),
            headers={**api.headers, "Content-Type": "application/x-protobuf"},
        )
        assert reply.status_code == 200
        answer = ExportTraceServiceResponse.FromString(reply.content)
        assert answer.partial_success.rejected_spans == 2
        assert "not a GenAI model call" in answer.partial_success.error_message
        assert "latency_ms" in answer.partial_success.error_message
        assert end_offsets(settings, "inference") == before
        unauthorised = httpx.post(
            f"{api.url}/v1/traces",
            content=_encoded(spans[:1]),
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert unauthorised.status_code == 401

    events = _by_span_name(consume(settings, settings.topic("inference"), expected=4))
    assert len(events) == 4
    chat = events["chat gpt-4o"]
    assert (chat.model_id, chat.model_version) == ("support-bot", "gpt-4o-2024-08-06")
    assert (chat.prompt, chat.response) == ("Where is my card?", "It ships tomorrow.")
    assert [(m.role, m.content) for m in chat.messages or []] == [
        ("system", "Be brief."),
        ("user", "Where is my card?"),
    ]
    assert (chat.prompt_tokens, chat.completion_tokens, chat.latency_ms) == (12, 34, 842.5)
    assert chat.finish_reason == "stop" and chat.segment == {"locale": "de"}
    assert chat.request_id == format(spans[0].context.span_id, "016x")
    assert chat.started_at.timestamp() == T0 / 1e9

    openllmetry = events["openai.chat"]
    assert (openllmetry.prompt, openllmetry.response) == (
        "Reset my PIN",
        "Open the app, then Settings.",
    )
    assert (openllmetry.prompt_tokens, openllmetry.completion_tokens) == (5, 7)
    assert openllmetry.model_version == "gpt-4o-mini"

    phoenix = events["ChatCompletion"]
    assert (phoenix.model_id, phoenix.model_version) == ("phoenix-bot", "claude-3-5-sonnet")
    assert (phoenix.prompt, phoenix.response, phoenix.prompt_tokens) == ("Is it raining?", "No.", 9)
    assert phoenix.latency_ms == 55

    legacy = events["text_completion"]
    assert (legacy.prompt, legacy.response) == ("Say hi", "hi")
    assert (legacy.status, legacy.error_code) == ("error", "rate_limited")


def test_otlp_json_encoding_with_hex_ids_is_read_and_answered_in_json(
    kafka_settings: Settings, unique_name: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    settings = topic_settings(kafka_settings, unique_name)
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "name": "chat",
                                "startTimeUnixNano": str(T0),
                                "endTimeUnixNano": str(T0 + 250_000_000),
                                "attributes": [
                                    {"key": "gen_ai.request.model", "value": {"stringValue": "m"}},
                                    {
                                        "key": "gen_ai.usage.input_tokens",
                                        "value": {"intValue": "4"},
                                    },
                                ],
                            },
                            {"spanId": "00000000000000aa", "name": "db", "startTimeUnixNano": "1"},
                        ]
                    }
                ],
            }
        ]
    }
    with running_api(settings, tmp_path, free_port()) as api:
        reply = httpx.post(f"{api.url}/v1/traces", json=body, headers=api.headers)
        assert reply.status_code == 200
        assert reply.json()["partialSuccess"]["rejectedSpans"] == "1"
        bad = httpx.post(f"{api.url}/v1/traces", json=[1], headers=api.headers)
        assert bad.status_code == 400
        other = httpx.post(
            f"{api.url}/v1/traces",
            content=b"x",
            headers={**api.headers, "Content-Type": "text/plain"},
        )
        assert other.status_code == 415
    (record,) = consume(settings, settings.topic("inference"), expected=1)
    event = InferenceEvent.model_validate_json(record.value)
    assert (event.request_id, event.model_id, event.model_version) == (
        "eee19b7ec3c1b174",
        "json-svc",
        "m",
    )
    assert (event.latency_ms, event.prompt_tokens) == (250, 4)
    assert event.metadata["trace_id"] == "5b8efff798038103d269b633813fc60c"


def test_spans_that_are_not_model_calls_are_not_inferences() -> None:
    request = ExportTraceServiceRequest()
    request.ParseFromString(_encoded(_spans()))
    spans = request.resource_spans[0].scope_spans[0].spans
    agent = spans[0]
    agent.attributes[0].value.string_value = "execute_tool"  # gen_ai.operation.name
    with pytest.raises(ValueError, match="not a GenAI model call"):
        inference_fields(agent, {})


def _encoded(spans: list[Any]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializeToString()
