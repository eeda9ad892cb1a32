"""Pure data: the wire events and the stored tables' shapes."""

from genmon.schemas.events import (
    EVENT_MODELS,
    SCHEMA_VERSION,
    DeadLetter,
    FeedbackEvent,
    Finding,
    FindingKind,
    FinishReason,
    IncidentEvent,
    IncidentStatus,
    InferenceEvent,
    InferenceStatus,
    RetrainRequest,
    RetrainStatus,
    Severity,
    Thumbs,
)

__all__ = [
    "EVENT_MODELS",
    "SCHEMA_VERSION",
    "DeadLetter",
    "FeedbackEvent",
    "Finding",
    "FindingKind",
    "FinishReason",
    "IncidentEvent",
    "IncidentStatus",
    "InferenceEvent",
    "InferenceStatus",
    "RetrainRequest",
    "RetrainStatus",
    "Severity",
    "Thumbs",
]
