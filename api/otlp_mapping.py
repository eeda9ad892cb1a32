"""OpenTelemetry spans -> genmon inference events (pure: no FastAPI, no Kafka).

A service instrumented for an OpenTelemetry GenAI backend (Phoenix, Langfuse, Traceloop,
an OTel collector) sends genmon the same spans. One span of a model call becomes one
:class:`~genmon.schemas.events.InferenceEvent`; other spans (HTTP, database, tools,
agents, embeddings) are not inferences and are counted as rejected by the route.

**Which spans.** A span with ``openinference.span.kind`` is one when that kind is ``LLM``
(OpenInference). Otherwise a span with any ``gen_ai.*`` attribute or ``gen_ai.*`` event
is one, unless ``gen_ai.operation.name`` is ``execute_tool``, ``invoke_agent``,
``create_agent`` or ``embeddings`` (not a generation).

**Fields** (the first that is present wins; span attributes before resource ones):

===================  ===================================================================
model_id             ``genmon.model_id``; ``service.name`` (unless the SDK's
                     ``unknown_service...``); the model name below
model_version        ``genmon.model_version``; the model name: ``gen_ai.response.model``,
                     ``gen_ai.request.model``, ``llm.model_name``; ``service.version``
request_id           ``genmon.request_id``; the span id (16 hex digits)
started_at, latency  the span's start; end - start (a span without an end is refused)
prompt_tokens        ``gen_ai.usage.input_tokens``, ``gen_ai.usage.prompt_tokens``,
                     ``llm.token_count.prompt``
completion_tokens    ``gen_ai.usage.output_tokens``, ``gen_ai.usage.completion_tokens``,
                     ``llm.token_count.completion``
messages             ``gen_ai.input.messages`` (+ ``gen_ai.system_instructions``);
                     ``gen_ai.prompt.N.role/content`` (OpenLLMetry);
                     ``llm.input_messages.N.message.role/content`` (OpenInference); the
                     ``gen_ai.prompt`` of a ``gen_ai.content.prompt`` event; the events
                     ``gen_ai.{system,user,assistant,tool}.message``
prompt               the last user turn of the messages; ``input.value``; a plain-text
                     ``gen_ai.prompt``
response             the text of ``gen_ai.output.messages``; ``gen_ai.completion.0.content``;
                     ``llm.output_messages.0.message.content``; the ``gen_ai.completion``
                     of a ``gen_ai.content.completion`` event; a ``gen_ai.choice`` event;
                     ``output.value``
finish_reason        ``gen_ai.response.finish_reasons[0]`` (or the output message's)
status, error_code   ERROR span status -> ``error``; ``error.type`` or the exception
                     event's ``exception.type``
segment, subject_id  ``genmon.segment.<key>`` attributes; ``genmon.subject_id``
metadata             trace and span ids, span name, operation, provider
                     (``gen_ai.provider.name``, ``gen_ai.system``, ``llm.provider``),
                     ``gen_ai.response.id``
===================  ===================================================================

The route validates the fields as the SDK would (:mod:`genmon.api.ingest_events`): texts
cut to ``sdk.max_text_chars``, the prompt taken from the last user turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from genmon.schemas.events import MAX_MESSAGES, FinishReason

#: ``gen_ai.operation.name`` values that are not a model generating text.
NOT_GENERATIONS: Final = frozenset({"execute_tool", "invoke_agent", "create_agent", "embeddings"})
#: OTLP ``Status.code`` of a failed span.
STATUS_CODE_ERROR: Final = 2
_ROLES: Final = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
}
_FINISH: Final = {
    "stop": FinishReason.STOP,
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "max_tokens": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    "safety": FinishReason.CONTENT_FILTER,
    "tool_calls": FinishReason.TOOL_CALLS,
    "tool_call": FinishReason.TOOL_CALLS,
    "tool_use": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
}
_ROLE_EVENTS: Final = {
    f"gen_ai.{role}.message": role for role in ("system", "user", "assistant", "tool")
}


class NotAnInference(ValueError):
    """The span is not a model call (or has no model to name): the reason says why."""


def any_value(value: Any) -> Any:
    """An OTLP ``AnyValue`` as Python (str, bool, int, float, bytes, list, dict)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(pairs: Iterable[Any]) -> dict[str, Any]:
    """OTLP ``KeyValue`` pairs as a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs}


def is_inference(attrs: Mapping[str, Any], event_names: Iterable[str] = ()) -> bool:
    """Whether span attributes (and event names) describe a model generating text."""
    kind = attrs.get("openinference.span.kind")
    if isinstance(kind, str):
        return kind.upper() == "LLM"
    if attrs.get("gen_ai.operation.name") in NOT_GENERATIONS:
        return False
    return any(key.startswith("gen_ai.") for key in attrs) or any(
        name.startswith("gen_ai.") for name in event_names
    )


def inference_fields(span: Any, resource: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of the span's inference event (validated by the caller), or
    :class:`NotAnInference`. ``span`` is an OTLP ``Span`` message, ``resource`` its
    resource's attributes (:func:`attributes`)."""
    attrs = attributes(span.attributes)
    events = [(event.name, attributes(event.attributes)) for event in span.events]
    if not is_inference(attrs, (name for name, _ in events)):
        raise NotAnInference("not a GenAI model call (no gen_ai.* / OpenInference LLM span)")

    def first(*keys: str, scopes: tuple[Mapping[str, Any], ...] = (attrs,)) -> Any:
        for scope in scopes:
            for key in keys:
                value = scope.get(key)
                if value not in (None, ""):
                    return value
        return None

    both = (attrs, resource)
    model_name = first("gen_ai.response.model", "gen_ai.request.model", "llm.model_name")
    service = resource.get("service.name")
    if isinstance(service, str) and service.startswith("unknown_service"):
        service = None
    model_id = first("genmon.model_id", scopes=both) or service or model_name
    if not model_id:
        raise NotAnInference("no model: set genmon.model_id or service.name, or gen_ai.*.model")
    if not span.end_time_unix_nano:
        raise NotAnInference("the span has no end time")
    span_id = span.span_id.hex()
    fields: dict[str, Any] = {
        "request_id": str(first("genmon.request_id") or span_id or span.trace_id.hex()),
        "model_id": str(model_id),
        "model_version": str(
            first("genmon.model_version", scopes=both)
            or model_name
            or first("service.version", scopes=(resource,))
            or "unknown"
        ),
        "started_at": _time(span.start_time_unix_nano),
        "finished_at": _time(span.end_time_unix_nano),
        "latency_ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
    }
    tokens = {
        "prompt_tokens": first(
            "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"
        ),
        "completion_tokens": first(
            "gen_ai.usage.output_tokens",
            "gen_ai.usage.completion_tokens",
            "llm.token_count.completion",
        ),
    }
    fields.update({key: value for key, value in tokens.items() if value is not None})
    messages, prompt = _input(attrs, events)
    if messages:
        fields["messages"] = messages[-MAX_MESSAGES:]
    if prompt is None and not messages:
        prompt = _text(first("input.value"))
    if prompt is not None:
        fields["prompt"] = prompt
    response, finish = _output(attrs, events)
    if response is None:
        response = _text(first("output.value"))
    if response is not None:
        fields["response"] = response
    reasons = attrs.get("gen_ai.response.finish_reasons")
    if isinstance(reasons, list) and reasons:
        finish = str(reasons[0])
    elif isinstance(reasons, str):
        finish = reasons
    if finish:
        fields["finish_reason"] = _FINISH.get(finish.lower(), FinishReason.OTHER)
    if span.status.code == STATUS_CODE_ERROR:
        fields["status"] = "error"
        error = first("error.type") or next(
            (a.get("exception.type") for name, a in events if name == "exception"), None
        )
        if error:
            fields["error_code"] = str(error)[:128]
    segment = {
        key.removeprefix("genmon.segment."): str(value)
        for scope in (resource, attrs)
        for key, value in scope.items()
        if key.startswith("genmon.segment.")
    }
    if segment:
        fields["segment"] = segment
    subject = first("genmon.subject_id", scopes=both)
    if subject:
        fields["subject_id"] = str(subject)
    metadata = {
        "trace_id": span.trace_id.hex(),
        "span_id": span_id,
        "span_name": span.name,
        "gen_ai.operation.name": first("gen_ai.operation.name"),
        "gen_ai.provider.name": first("gen_ai.provider.name", "gen_ai.system", "llm.provider"),
        "gen_ai.response.id": first("gen_ai.response.id"),
    }
    fields["metadata"] = {key: value for key, value in metadata.items() if value}
    return fields


def _time(unix_nano: int) -> datetime:
    return datetime.fromtimestamp(unix_nano / 1e9, UTC)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _json(value: Any) -> Any:
    """A JSON-string attribute parsed (instrumentations store structures as JSON text)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _content(message: Mapping[str, Any]) -> str:
    """The text of a message: ``content`` (a string or parts) or ``parts`` (new GenAI)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = message.get("parts") if content is None else content
    if isinstance(parts, list):
        texts = [
            part.get("content") or part.get("text")
            for part in parts
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        ]
        return "".join(text for text in texts if isinstance(text, str))
    return "" if content is None else json.dumps(content)


def _turns(raw: Any) -> list[dict[str, str]]:
    """Chat turns of a JSON list of ``{role, content | parts}`` (unknown roles dropped)."""
    turns = []
    for message in raw if isinstance(raw, list) else []:
        if isinstance(message, Mapping):
            role = _ROLES.get(str(message.get("role", "")).lower())
            if role is not None:
                turns.append({"role": role, "content": _content(message)})
    return turns


def _indexed(attrs: Mapping[str, Any], prefix: str, suffix: str = "") -> list[dict[str, Any]]:
    """``<prefix>.N.<suffix>role`` / ``content`` flattened lists, in order of N."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in attrs.items():
        if not key.startswith(prefix + "."):
            continue
        index, _, rest = key[len(prefix) + 1 :].partition(".")
        if index.isdigit() and rest in (suffix + "role", suffix + "content"):
            found.setdefault(int(index), {})[rest.removeprefix(suffix)] = value
    return [found[index] for index in sorted(found)]


def _input(
    attrs: Mapping[str, Any], events: list[tuple[str, dict[str, Any]]]
) -> tuple[list[dict[str, str]], str | None]:
    """The chat turns sent, and a plain-text prompt when there are no turns."""
    structured = _json(attrs.get("gen_ai.input.messages"))
    if structured is not None:
        turns = _turns(structured)
        system = _json(attrs.get("gen_ai.system_instructions"))
        if system is not None:
            parts = system if isinstance(system, list) else [system]
            text = _content({"parts": parts}) if isinstance(system, list) else str(system)
            turns.insert(0, {"role": "system", "content": text})
        return turns, None
    for prefix, suffix in (("gen_ai.prompt", ""), ("llm.input_messages", "message.")):
        flat = _turns(_indexed(attrs, prefix, suffix))
        if flat:
            return flat, None
    for name, event_attrs in events:
        if name == "gen_ai.content.prompt" and "gen_ai.prompt" in event_attrs:
            raw = _json(event_attrs["gen_ai.prompt"])
            turns = _turns(raw)
            return (turns, None) if turns else ([], _text(raw))
    turns = []
    for name, event_attrs in events:
        if name in _ROLE_EVENTS:
            body = _json(event_attrs.get("gen_ai.event.content")) or event_attrs
            message = body if isinstance(body, Mapping) else {"content": body}
            turns.append({"role": _ROLE_EVENTS[name], "content": _content(message)})
    return turns, None


def _output(
    attrs: Mapping[str, Any], events: list[tuple[str, dict[str, Any]]]
) -> tuple[str | None, str | None]:
    """The response text and the finish reason the output messages give."""
    structured = _json(attrs.get("gen_ai.output.messages"))
    if isinstance(structured, list) and structured:
        first = structured[0] if isinstance(structured[0], Mapping) else {}
        finish = first.get("finish_reason")
        return _content(first), finish if isinstance(finish, str) else None
    for prefix, suffix in (("gen_ai.completion", ""), ("llm.output_messages", "message.")):
        flat = _indexed(attrs, prefix, suffix)
        if flat and "content" in flat[0]:
            return _text(flat[0]["content"]), None
    for name, event_attrs in events:
        if name == "gen_ai.content.completion" and "gen_ai.completion" in event_attrs:
            raw = _json(event_attrs["gen_ai.completion"])
            turns = _turns(raw)
            return (turns[0]["content"] if turns else _text(raw)), None
        if name == "gen_ai.choice":
            message = _json(event_attrs.get("gen_ai.event.content") or event_attrs.get("message"))
            if isinstance(message, Mapping):
                inner = message.get("message", message)
                finish = message.get("finish_reason")
                text = _content(inner) if isinstance(inner, Mapping) else _text(inner)
                return text, finish if isinstance(finish, str) else None
    return None, None
