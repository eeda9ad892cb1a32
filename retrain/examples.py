"""What training and evaluation take: one prompt with the completion it should get.

Built from ``labelled_example`` rows by :mod:`genmon.retrain.dataset`; a correction gives
the target (``completion``) and, with the logged response, a preference pair
(``rejected``). Plain data, shared by the dataset builder, the trainer and the gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class SftExample:
    """``prompt`` -> ``completion`` (the correction); ``rejected`` is what was served."""

    prompt: str
    completion: str
    rejected: str | None = None
    segment: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    request_id: str = ""
    label: str | None = None

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
        )
