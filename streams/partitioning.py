"""Which source partition a key or an event belongs to.

The pipeline keeps each model's panes, joins and windows on the partition number its
events came from, and ``genmon replay`` must put them where a worker would. Where ingest
reported the source positions of a batch (:data:`genmon.streams.ingest.SOURCE_POSITIONS`)
they decide; otherwise the model id is hashed as Kafka's default partitioner does, which
is where producers that key by model id (the SDK does) sent it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from aiokafka.partitioner import murmur2


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives ``key``, as the SDK sends."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def group_by_partition(
    events: Sequence[Any], partitions: int
) -> dict[int, list[tuple[int | None, Any]]]:
    """``events`` by source partition, each with its offset where ingest reported it."""
    from genmon.streams import ingest

    positions = getattr(ingest, "SOURCE_POSITIONS", None)
    known = positions.get() if positions is not None else None
    grouped: dict[int, list[tuple[int | None, Any]]] = defaultdict(list)
    if known is not None and len(known) == len(events):
        for (partition, offset), event in zip(known, events, strict=True):
            grouped[partition].append((offset, event))
    else:
        for event in events:
            grouped[partition_for(event.model_id, partitions)].append((None, event))
    return grouped
