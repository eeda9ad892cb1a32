"""genmon's Kafka topics as Faust declarations.

They are created on the broker by ``genmon infra up`` and by ``genmon worker``
(:meth:`genmon.infra.kafka.KafkaBroker.ensure_topics`).

Every genmon topic carries raw bytes (``value_serializer='raw'``): agents decode
with :func:`genmon.schemas.codec.decode` so bad bytes become dead letters instead
of crashing a Faust deserializer, and producers encode with
:func:`genmon.schemas.codec.encode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import faust
from faust.types import TopicT

from genmon.settings import TOPIC_KINDS, Settings

#: Topics the ingest agents read from producers outside genmon.
INPUT_KINDS = ("inference", "feedback")


class GenmonTopics(Mapping[str, TopicT]):
    """The Faust topic of each kind in :data:`genmon.settings.TOPIC_KINDS`.

    ``topics["findings"]`` or ``topics.findings``; iteration yields the kinds.
    """

    def __init__(self, by_kind: Mapping[str, TopicT]) -> None:
        self._by_kind = dict(by_kind)

    def __getitem__(self, kind: str) -> TopicT:
        return self._by_kind[kind]

    def __getattr__(self, kind: str) -> TopicT:
        try:
            return self._by_kind[kind]
        except KeyError:
            raise AttributeError(kind) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_kind)

    def __len__(self) -> int:
        return len(self._by_kind)


def declare_topics(app: faust.App, settings: Settings) -> GenmonTopics:
    """Declare every genmon topic on ``app`` (no broker traffic)."""
    return GenmonTopics(
        {
            kind: app.topic(
                settings.topic(kind),
                key_serializer="raw",
                value_serializer="raw",
                partitions=settings.kafka.partitions,
                retention=settings.kafka.retention_ms / 1000.0,
            )
            for kind in TOPIC_KINDS
        }
    )
