"""The producer side of the wire's loss accounting: ``genmon-seq`` numbers per topic kind
and model, under a ``genmon-producer`` id (the headers of :mod:`genmon.schemas.codec`).

The SDK's :class:`~genmon.Monitor` and the API's HTTP ingest producer number their
events with one :class:`Sequences` each, so the worker counts gaps, reorders and
duplicates the same way whichever sent them.
"""

from __future__ import annotations

import collections


class Sequences:
    """The next ``genmon-seq`` number of each (kind, model), an LRU of ``max_pairs``.

    A pair pushed out and seen again counts from 0 under ``<producer id>.<evictions>``:
    a new sequence for the worker, so an eviction invents neither a gap nor a reorder.
    Not thread-safe: callers number events under their own lock.
    """

    def __init__(self, producer_id: str, max_pairs: int) -> None:
        self.producer_id = producer_id
        self._max = max_pairs
        self._evicted = 0
        #: (kind, model) -> (producer id header, next sequence number), least recent first.
        self._next: collections.OrderedDict[tuple[str, str], tuple[bytes, int]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        """How many pairs are numbered now (at most ``max_pairs``)."""
        return len(self._next)

    def take(self, kind: str, model_id: str) -> tuple[bytes, int]:
        """The producer id header and the sequence number of the next event of the pair."""
        key = (kind, model_id)
        known = self._next.get(key)
        if known is None:
            suffix = f".{self._evicted}" if self._evicted else ""
            producer, seq = f"{self.producer_id}{suffix}".encode(), 0
            if len(self._next) >= self._max:
                self._next.popitem(last=False)
                self._evicted += 1
        else:
            producer, seq = known
            self._next.move_to_end(key)
        self._next[key] = (producer, seq + 1)
        return producer, seq
