"""The key-value store the window state lives in: its interface, key layout and buffering.

:class:`~genmon.streams.windows.state.WindowState` is pure Python over the small
:class:`StateStore` interface, so it runs unchanged in unit tests (a :class:`DictStore`)
and in the worker (a Faust table, see :mod:`genmon.streams.pipeline`).

All state of partition ``p`` lives under keys that start with ``"<p>\\x1f"`` and is
written to changelog partition ``p``:

- ``<p> P <model> <version> <segment> <pane_start>``: a pane's
  :class:`~genmon.streams.windows.stats.WindowStats` (:func:`pane_key`);
- ``<p> S <seq>``: a *join segment* (:func:`segment_key`): the join entries
  (:mod:`genmon.streams.windows.join`) changed in one batch, keyed by ``model, request_id``
  (a dict, or its JSON as bytes from the native join table). Entries live in memory; a
  segment record is deleted once none of its entries is current (superseded by a later
  segment or expired). One record per batch instead of one per event keeps the changelog
  traffic per event small (each table write is one Kafka message through Faust's producer);
- ``<p> W <model> <kind> <end>``: a closed window's record not yet acknowledged by the
  broker (:func:`window_key`): the window stage's outbox. A record is written here, with
  the mark that says its window closed, and flushed before it is sent, so after a crash
  or a rebalance it is sent again as it was, never recomputed from other events;
- ``<p> M``: the partition's mark (:func:`mark_key`,
  :meth:`~genmon.streams.windows.partition.PartitionState.mark`): per model, its watermark
  and the last closed window end per window family; the last applied source offset per
  topic; and per model the eviction floor.

:func:`~genmon.streams.windows.partition.restore_partitions` reads the layout back.

A *buffered* state (the worker's) holds its writes in a :class:`BufferedStore` and writes
them on flush, which the worker calls before each offset commit: one write per changed key
per flush instead of per batch, and panes stay live ``WindowStats`` between batches,
serialised by the flush. The flush writes the partition's records, then its deletes, then
its mark, so a crash loses all the batches since the last flush whole, or part-way leaves
the old mark, and redelivery from the last commit replays them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from genmon.streams.windows.aggregates import PaneKey

#: Separates the fields of a key (the ASCII unit separator).
SEP = "\x1f"


class StateStore(Protocol):
    """What the window state needs from a table: reads, and writes to a given partition."""

    def get(self, key: str) -> Any | None: ...

    def put(self, partition: int, key: str, value: Any) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def all_keys(self) -> Iterable[str]: ...


class DictStore:
    """A :class:`StateStore` in a dict, recording writes per partition (for tests)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes = 0

    def get(self, key: str) -> Any | None:
        return self.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.writes += 1
        self.data[key] = value

    def delete(self, partition: int, key: str) -> None:
        self.writes += 1
        self.data.pop(key, None)

    def all_keys(self) -> Iterable[str]:
        return list(self.data)


class _Deleted:
    """What a held delete holds (``None`` is a value a store may hold)."""


_DELETED = _Deleted()


class BufferedStore:
    """A :class:`StateStore` that holds each partition's writes in memory until :meth:`flush`.

    Reads see the held writes. A value with a ``to_state()`` (a pane's ``WindowStats``)
    stays that object, also after a flush, until its key is deleted or its partition
    dropped: only the flush after a put of it serialises it.

    :meth:`flush` writes a partition's puts, then its deletes, then its mark
    (``mark_key(partition)``). A crash part-way leaves the old mark over newer records,
    as a crash within a batch does; deletes come after the puts so that a join segment
    record is never gone before the record superseding its entries is written.
    """

    def __init__(self, inner: StateStore, mark_key: Callable[[int], str]) -> None:
        self.inner = inner
        self.mark_key = mark_key
        self._held: dict[str, tuple[int, Any]] = {}
        self._live: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        held = self._held.get(key)
        if held is not None:
            return None if held[1] is _DELETED else held[1]
        live = self._live.get(key)
        return live if live is not None else self.inner.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self._held[key] = (partition, value)
        if hasattr(value, "to_state"):
            self._live[key] = value
        else:
            self._live.pop(key, None)

    def delete(self, partition: int, key: str) -> None:
        self._held[key] = (partition, _DELETED)
        self._live.pop(key, None)

    def all_keys(self) -> Iterable[str]:
        keys = dict.fromkeys(self.inner.all_keys())
        for key, (_, value) in self._held.items():
            if value is _DELETED:
                keys.pop(key, None)
            else:
                keys[key] = None
        return list(keys)

    def flush(self) -> None:
        """Write the held writes to the inner store, each partition's mark last."""
        by_partition: dict[int, list[tuple[str, Any]]] = {}
        for key, (partition, value) in self._held.items():
            by_partition.setdefault(partition, []).append((key, value))
        self._held = {}
        inner = self.inner
        for partition, writes in by_partition.items():
            mark = self.mark_key(partition)
            last = [(key, value) for key, value in writes if key == mark]
            deletes = [key for key, value in writes if value is _DELETED and key != mark]
            for key, value in writes:
                if value is not _DELETED and key != mark:
                    inner.put(partition, key, _serialised(value))
            for key in deletes:
                # A record put and deleted between two flushes never reached the store.
                if inner.get(key) is not None:
                    inner.delete(partition, key)
            for key, value in last:
                if value is _DELETED:
                    inner.delete(partition, key)
                else:
                    inner.put(partition, key, value)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the held writes and live objects of ``partitions`` (unflushed: lost)."""
        dropped = set(partitions)
        prefixes = tuple(f"{p}{SEP}" for p in dropped)
        self._held = {k: held for k, held in self._held.items() if held[0] not in dropped}
        self._live = {k: live for k, live in self._live.items() if not k.startswith(prefixes)}


def _serialised(value: Any) -> Any:
    return value.to_state() if hasattr(value, "to_state") else value


def pane_key(partition: int, key: PaneKey) -> str:
    """Where a pane's statistics live."""
    return SEP.join(
        (
            str(partition),
            "P",
            key.model_id,
            key.model_version,
            key.segment,
            str(key.pane_start_ms),
        )
    )


def segment_key(partition: int, seq: int) -> str:
    """Where join segment ``seq`` lives (zero-padded: keys sort in write order)."""
    return SEP.join((str(partition), "S", f"{seq:012d}"))


def mark_key(partition: int) -> str:
    """Where the partition's mark lives."""
    return f"{partition}{SEP}M"


def window_key(partition: int, model_id: str, kind: str, end_ms: int) -> str:
    """Where a closed window's record waits until the broker has it."""
    return SEP.join((str(partition), "W", model_id, kind, str(end_ms)))
