"""Joining feedback to its inference by request id: pure logic over JSON entries.

One entry per ``(model_id, request_id)`` holds what the join needs, as JSON:

- ``inf``: the inference's model version, prompt, response (cut to
  ``feedback.join_max_text_chars``), segment, subject id and event time — or ``None``
  while only feedback has arrived;
- ``fb``: feedback that arrived before its inference (kept until the inference comes or
  the entry expires; then each is counted as *orphaned*);
- ``seen``: feedback ids already joined, so a redelivered feedback event is not counted
  twice in the aggregates (the database insert is idempotent on its own);
- ``exp``: event time (ms) after which the entry is dropped: the latest event time of
  either side plus ``feedback.join_ttl_s``.

Time is *event time* against the partition watermark, like the windows, so a replay
joins exactly as the live stream did.

>>> from genmon.schemas.events import FeedbackEvent, InferenceEvent
>>> j = FeedbackJoiner(ttl_ms=60_000, max_text_chars=100)
>>> fb = FeedbackEvent(request_id="r1", model_id="m", thumbs="down")
>>> entry, pairs = j.on_feedback(None, fb)
>>> pairs, len(entry["fb"])
([], 1)
>>> inf = InferenceEvent(request_id="r1", model_id="m", latency_ms=5.0, response="no")
>>> entry, pairs = j.on_inference(entry, inf)
>>> len(pairs), entry["fb"]
(1, [])
"""

from __future__ import annotations

from typing import Any, NamedTuple

from genmon.schemas.events import FeedbackEvent, InferenceEvent


class JoinedPair(NamedTuple):
    """An inference (as stored for the join) and one feedback event that matched it."""

    model_id: str
    request_id: str
    inference: dict[str, Any]
    feedback: dict[str, Any]

    @property
    def join_time_ms(self) -> int:
        """When the pair became complete, in event time: the later of both sides."""
        return max(int(self.inference["t"]), int(self.feedback["t"]))

    @property
    def segment(self) -> dict[str, str]:
        return {**self.inference["segment"], **self.feedback["segment"]}

    @property
    def subject_id(self) -> str | None:
        subject: str | None = self.inference["subject"] or self.feedback["subject"]
        return subject

    def example_row(self) -> dict[str, Any]:
        """Column values of the ``labelled_example`` row for this pair."""
        return {
            "request_id": self.request_id,
            "model_id": self.model_id,
            "model_version": self.inference["version"],
            "prompt": self.inference["prompt"],
            "response": self.inference["response"],
            "correction": self.feedback["correction"],
            "score": self.feedback["score"],
            "label": self.feedback["label"],
            "segment": self.segment,
            "subject_id": self.subject_id,
        }


def join_key(model_id: str, request_id: str) -> str:
    return f"{model_id}\x1f{request_id}"


class FeedbackJoiner:
    """Updates join entries; callers store them (a Faust table in the worker)."""

    def __init__(self, ttl_ms: int, max_text_chars: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"feedback.join_ttl_s must be > 0, got {ttl_ms / 1000:g}")
        if max_text_chars < 0:
            raise ValueError(f"feedback.join_max_text_chars must be >= 0, got {max_text_chars}")
        self.ttl_ms = ttl_ms
        self.max_text_chars = max_text_chars

    def inference_record(self, event: InferenceEvent) -> dict[str, Any]:
        cut = self.max_text_chars
        return {
            "version": event.model_version,
            "prompt": event.prompt[:cut],
            "response": event.response[:cut],
            "segment": dict(event.segment),
            "subject": event.subject_id,
            "t": int(event.started_at.timestamp() * 1000),
        }

    @staticmethod
    def feedback_record(event: FeedbackEvent) -> dict[str, Any]:
        return {
            "id": event.feedback_id,
            "score": event.normalized_score,
            "label": event.label,
            "correction": event.correction,
            "segment": dict(event.segment),
            "subject": event.subject_id,
            "t": int(event.created_at.timestamp() * 1000),
        }

    def on_inference(
        self, entry: dict[str, Any] | None, event: InferenceEvent
    ) -> tuple[dict[str, Any], list[JoinedPair]]:
        """The entry after ``event`` arrives, and the pairs it completes (waiting feedback)."""
        return self.on_inference_record(
            entry, event.model_id, event.request_id, self.inference_record(event)
        )

    def on_inference_record(
        self, entry: dict[str, Any] | None, model_id: str, request_id: str, record: dict[str, Any]
    ) -> tuple[dict[str, Any], list[JoinedPair]]:
        """:meth:`on_inference` with the inference already as :meth:`inference_record`."""
        entry = _copy(entry)
        entry["inf"] = record
        entry["exp"] = max(entry["exp"], record["t"] + self.ttl_ms)
        pairs = [JoinedPair(model_id, request_id, record, fb) for fb in entry["fb"]]
        entry["seen"].extend(fb["id"] for fb in entry["fb"])
        entry["fb"] = []
        return entry, pairs

    def on_feedback(
        self, entry: dict[str, Any] | None, event: FeedbackEvent
    ) -> tuple[dict[str, Any], list[JoinedPair]]:
        """The entry after ``event`` arrives, and the pair it completes (if the inference is in)."""
        entry = _copy(entry)
        if event.feedback_id in entry["seen"] or any(
            fb["id"] == event.feedback_id for fb in entry["fb"]
        ):
            return entry, []  # redelivered: already joined or already waiting
        record = self.feedback_record(event)
        entry["exp"] = max(entry["exp"], record["t"] + self.ttl_ms)
        if entry["inf"] is None:
            entry["fb"].append(record)
            return entry, []
        entry["seen"].append(record["id"])
        return entry, [JoinedPair(event.model_id, event.request_id, entry["inf"], record)]

    @staticmethod
    def orphans(entry: dict[str, Any]) -> int:
        """Feedback in an expiring entry that never met its inference."""
        return len(entry["fb"])


def _copy(entry: dict[str, Any] | None) -> dict[str, Any]:
    if entry is None:
        return {"inf": None, "fb": [], "seen": [], "exp": 0}
    return {
        "inf": entry["inf"],
        "fb": list(entry["fb"]),
        "seen": list(entry["seen"]),
        "exp": entry["exp"],
    }
