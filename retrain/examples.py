"""What training and evaluation take: one prompt with the completion it should (or, for
KTO, should not) get.

Built from ``labelled_example`` rows by :mod:`genmon.retrain.dataset` and
:mod:`genmon.retrain.preference_data`: for ``sft`` and ``dpo`` a correction gives the target
(``completion``) and, with the logged response, a preference pair (``rejected``); for
``kto`` a thumb or score gives an unpaired example whose ``desirable`` says which way it
counts. Plain data, shared by the dataset builder, the trainer and the gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class SftExample:
    """``prompt`` -> ``completion`` (the correction, or for KTO the answer judged);
    ``rejected`` is what was served (SFT and DPO only)."""

    prompt: str
    completion: str
    rejected: str | None = None
    segment: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    request_id: str = ""
    label: str | None = None
    messages: list[dict[str, str]] | None = None
    """The chat turns before the response (``{role, content}``); ``prompt`` is then the last
    user turn. The trainer applies the base model's chat template to them."""
    desirable: bool | None = None
    """KTO's label: thumbs up or a good score (``True``), down or a bad score (``False``);
    ``None`` for an SFT/DPO example from a correction."""
    subject_id: str | None = None
    """The data subject the example came from (erasure finds it in built datasets)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SftExample:
        created = data.get("created_at")
        return cls(
            prompt=data["prompt"],
            completion=data["completion"],
            rejected=data.get("rejected"),
            segment=dict(data.get("segment") or {}),
            created_at=datetime.fromisoformat(created) if created else None,
            request_id=data.get("request_id", ""),
            label=data.get("label"),
            messages=data.get("messages"),
            desirable=data.get("desirable"),
            subject_id=data.get("subject_id"),
        )
