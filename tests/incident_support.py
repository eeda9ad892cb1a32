"""Helpers shared by the incident, notification and webhook tests (not a test module)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from genmon import db
from genmon.schemas import Finding
from genmon.settings import DestinationSettings, Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)

#: A PagerDuty routing key of the length PagerDuty issues (32 characters).
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
SCHEMAS = Path(__file__).parent / "schemas"


def vendor_schema(name: str) -> dict[str, Any]:
    """A vendor's payload JSON Schema from tests/schemas/, itself checked first."""
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


PAGERDUTY = vendor_schema("pagerduty_events_v2.schema.json")
ALERTMANAGER = vendor_schema("alertmanager_webhook_v4.schema.json")
SLACK = vendor_schema("slack_message.schema.json")


class FakeClock:
    """A settable clock for the manager (time is data here, not a measurement)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def finding(
    window: int = 0,
    *,
    model_id: str = "chat",
    detector: str = "page_hinkley",
    signal: str = "latency_ms",
    segment: str | None = None,
    detected: bool = True,
    score: float = 2.0,
    threshold: float = 1.0,
    effect_size: float | None = None,
    evidence: dict[str, Any] | None = None,
    kind: str = "anomaly",
) -> Finding:
    """A finding for window number ``window`` (same window -> same dedup key)."""
    end = T0 + timedelta(minutes=window + 1)
    return Finding(
        model_id=model_id,
        detector=detector,
        kind=kind,
        signal=signal,
        segment=segment,
        window_start=end - timedelta(minutes=1),
        window_end=end,
        score=score,
        threshold=threshold,
        detected=detected,
        effect_size=effect_size,
        evidence=evidence or {},
    )


def webhook(name: str, url: str, **extra: Any) -> DestinationSettings:
    return DestinationSettings.model_validate({"name": name, "url": url, **extra})


def settings_with(*destinations: DestinationSettings, **sections: dict[str, Any]) -> Settings:
    """Settings with these destinations; ``incidents={...}``/``notify={...}`` override fields.

    Incident events are not queued for the topic unless ``incidents={"publish_events":
    True}``: the shared broker's ``genmon.incidents`` is no place for tests' events, and
    the tests of the topic give theirs a prefix of their own.
    """
    settings = Settings.model_validate({})
    notify = settings.notify.model_copy(
        update={"destinations": list(destinations), **sections.get("notify", {})}
    )
    incidents = settings.incidents.model_copy(
        update={"publish_events": False, **sections.get("incidents", {})}
    )
    return settings.model_copy(update={"notify": notify, "incidents": incidents})


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'genmon.sqlite'}"


@contextmanager
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema of the test database, dropped after."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def migrated_engine(url: str) -> Engine:
    db.upgrade(url)
    return db.make_engine(url)
