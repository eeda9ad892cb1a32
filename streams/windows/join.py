"""Joining feedback to its inference by request id: one partition's join entries.

One entry per ``(model_id, request_id)`` (its *join key*) holds what the join needs:

- ``inf``: the inference's model version, prompt, response, chat ``messages`` when it has
  them (each text cut to ``feedback.join_max_text_chars``), segment, subject id and event
  time, or ``None`` while only feedback has arrived;
- ``fb``: feedback that arrived before its inference (kept until the inference comes or
  the entry goes; then each is counted as *orphaned*);
- ``seen``: feedback ids already joined, so a redelivered feedback event is not counted
  twice in the aggregates (the database insert is idempotent on its own);
- ``exp``: event time (ms) after which the entry is dropped: the latest event time of
  either side plus ``feedback.join_ttl_s``.

A :class:`JoinTable` keeps a partition's entries in memory, drops them when their model's
watermark passes ``exp`` (:meth:`~JoinTable.expire`) or when the partition holds more than
``feedback.join_max_entries`` (:meth:`~JoinTable.evict`: the entries with the least event
time left go first, ties by model id), and writes the changed ones as *segment records*
(``{"e": {join key: entry}}``, :meth:`~JoinTable.segments`); a record is dead, to be
deleted from the store, once none of its entries is current. Time is *event time*
against the watermark, like the windows, so a replay joins exactly as the live stream did.

This module is the reference; ``genmon_native.JoinTable`` (Rust) is the same
table without a Python object per entry, used when the native module is built
(:func:`genmon.streams.native.join_table`). ``tests/streams/test_native.py`` drives both with the
same random operations and compares what they return and write.

>>> table = JoinTable(ttl_ms=60_000, max_text_chars=100)
>>> table.add_feedback("m", "r1", {"id": "f1", "score": 0.0, "label": None,
...     "correction": None, "segment": {}, "subject": None, "t": 1000})
[]
>>> inference = {"version": "v1", "prompt": "hi", "response": "no", "segment": {},
...     "subject": None, "t": 900}
>>> [pair.feedback["id"] for pair in table.add_inference("m", "r1", inference)]
['f1']
>>> [(seq, sorted(record["e"])) for seq, record in table.segments(256 * 1024)]
[(0, ['m\\x1fr1'])]
>>> table.expire({"m": 61_000}), len(table)
((1, 0), 0)
>>> table.take_dead()
[0]
"""

from __future__ import annotations

import heapq
import json
from typing import Any, NamedTuple

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.streams.windows.aggregates import event_time_ms

SEP = "\x1f"


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
            # Entries written before chat messages existed have none.
            "messages": self.inference.get("messages"),
            "correction": self.feedback["correction"],
            "score": self.feedback["score"],
            "label": self.feedback["label"],
            "segment": self.segment,
            "subject_id": self.subject_id,
        }


def join_key(model_id: str, request_id: str) -> str:
    return f"{model_id}{SEP}{request_id}"


def inference_record(event: InferenceEvent, max_text_chars: int) -> dict[str, Any]:
    """What an entry keeps of an inference (the native decoder builds the same)."""
    record: dict[str, Any] = {
        "version": event.model_version,
        "prompt": event.prompt[:max_text_chars],
        "response": event.response[:max_text_chars],
    }
    if event.messages is not None:
        record["messages"] = kept_turns(
            [(m.role, m.content) for m in event.messages], max_text_chars
        )
    record.update(segment=dict(event.segment), subject=event.subject_id, t=event_time_ms(event))
    return record


def kept_turns(turns: list[tuple[str, str]], max_text_chars: int) -> list[dict[str, str]]:
    """The latest chat turns whose texts, each cut to ``max_text_chars``, fit together in
    ``max_text_chars`` (the latest one always, cut): an entry's messages then cost at most
    one more text, so the join's memory stays bounded whatever a chat's length. The
    native decoder keeps the same turns."""
    kept: list[dict[str, str]] = []
    total = 0
    for role, content in reversed(turns):
        content = content[:max_text_chars]
        if kept and total + len(content) > max_text_chars:
            break
        kept.append({"role": role, "content": content})
        total += len(content)
    kept.reverse()
    return kept


def _text_chars(inference: dict[str, Any]) -> int:
    """The characters of an entry's texts, which the record size estimate counts."""
    turns = inference.get("messages") or ()
    chars = len(inference["prompt"]) + len(inference["response"])
    return chars + sum(len(turn["content"]) for turn in turns)


def feedback_record(event: FeedbackEvent) -> dict[str, Any]:
    """What an entry keeps of a feedback event."""
    return {
        "id": event.feedback_id,
        "score": event.normalized_score,
        "label": event.label,
        "correction": event.correction,
        "segment": dict(event.segment),
        "subject": event.subject_id,
        "t": int(event.created_at.timestamp() * 1000),
    }


def record_entries(value: Any) -> dict[str, dict[str, Any]]:
    """The entries of a stored segment record (a dict, or its JSON as the native table puts it)."""
    if isinstance(value, bytes | bytearray):
        value = json.loads(value)
    entries: dict[str, dict[str, Any]] = value["e"]
    return entries


class JoinTable:
    """One partition's join entries, their expiry and eviction, and their segment records.

    ``floors`` holds per model the largest evicted ``(exp, join key)``: restore drops the
    model's entries at or below it, as it drops expired ones, so an evicted entry left in
    a record that still holds live entries does not come back. The caller stores it in the
    partition's mark.
    """

    def __init__(self, ttl_ms: int, max_text_chars: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"feedback.join_ttl_s must be > 0, got {ttl_ms / 1000:g}")
        if max_text_chars < 0:
            raise ValueError(f"feedback.join_max_text_chars must be >= 0, got {max_text_chars}")
        self.ttl_ms = ttl_ms
        self.max_text_chars = max_text_chars
        self.floors: dict[str, tuple[int, str]] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._pending: set[str] = set()
        self._per_model: dict[str, int] = {}
        # Per model a heap of (exp, join key); an item is current while its entry exists
        # with that exp (exp only grows, so an entry has at most one current item).
        self._heaps: dict[str, list[tuple[int, str]]] = {}
        self._unwritten: dict[str, None] = {}
        self._segment_of: dict[str, int] = {}
        self._live: dict[int, int] = {}
        self._models_in: dict[int, set[str]] = {}
        self._next_segment = 0
        self._dead: list[int] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        """Entries holding feedback that has not met its inference."""
        return len(self._pending)

    def entries(self) -> dict[str, dict[str, Any]]:
        """A copy of the live entries by join key."""
        return {key: _copy(entry) for key, entry in self._entries.items()}

    def models(self) -> set[str]:
        """Models with live entries."""
        return set(self._per_model)

    # -- the two sides ----------------------------------------------------------------
    def add_inference(
        self, model: str, request_id: str, record: dict[str, Any]
    ) -> list[JoinedPair]:
        """Put an inference's record in its entry; the pairs it completes (waiting feedback)."""
        key = join_key(model, request_id)
        exp = record["t"] + self.ttl_ms
        entry = self._entries.get(key)
        self._unwritten[key] = None
        if entry is None:
            self._new(model, key, {"inf": record, "fb": [], "seen": [], "exp": exp})
            return []
        pairs = [JoinedPair(model, request_id, record, fb) for fb in entry["fb"]]
        entry["inf"] = record
        entry["seen"].extend(fb["id"] for fb in entry["fb"])
        entry["fb"] = []
        self._pending.discard(key)
        self._extend(model, key, entry, exp)
        return pairs

    def add_feedback(self, model: str, request_id: str, record: dict[str, Any]) -> list[JoinedPair]:
        """Put a feedback record in its entry; the pair it completes (if the inference is in).

        A redelivered feedback (its id already joined or waiting) changes nothing.
        """
        key = join_key(model, request_id)
        exp = record["t"] + self.ttl_ms
        entry = self._entries.get(key)
        if entry is None:
            entry = self._new(model, key, {"inf": None, "fb": [], "seen": [], "exp": exp})
        elif record["id"] in entry["seen"] or any(fb["id"] == record["id"] for fb in entry["fb"]):
            return []
        else:
            self._extend(model, key, entry, exp)
        self._unwritten[key] = None
        if entry["inf"] is None:
            entry["fb"].append(record)
            self._pending.add(key)
            return []
        entry["seen"].append(record["id"])
        return [JoinedPair(model, request_id, entry["inf"], record)]

    def _new(self, model: str, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        self._entries[key] = entry
        self._per_model[model] = self._per_model.get(model, 0) + 1
        heapq.heappush(self._heaps.setdefault(model, []), (entry["exp"], key))
        return entry

    def _extend(self, model: str, key: str, entry: dict[str, Any], exp: int) -> None:
        if exp > entry["exp"]:
            entry["exp"] = exp
            heapq.heappush(self._heaps.setdefault(model, []), (exp, key))
            self._compact()

    # -- dropping entries -------------------------------------------------------------
    def expire(self, watermarks: dict[str, int]) -> tuple[int, int]:
        """Drop the entries whose model's watermark reached ``exp``: (dropped, orphaned)."""
        dropped = orphaned = 0
        for model, watermark in watermarks.items():
            while (item := self._top(model)) is not None and item[0] <= watermark:
                orphaned += self._drop(model)
                dropped += 1
        return dropped, orphaned

    def evict(self, max_entries: int, watermarks: dict[str, int]) -> tuple[int, int]:
        """Drop entries beyond ``max_entries``, least event time left first: (evicted, orphaned).

        Also drops entries at or below their model's floor (a late event can create one),
        which keeps every live entry above the floor restore filters by, and forgets floors
        their model's watermark has passed (the watermark drops those entries anyway).
        """
        evicted = orphaned = 0
        for model, floor in self.floors.items():
            while (item := self._top(model)) is not None and item <= floor:
                orphaned += self._drop(model)
                evicted += 1
        excess = len(self._entries) - max_entries
        if excess > 0:
            soonest = [
                (self._time_left(model, item, watermarks), model)
                for model in self._heaps
                if (item := self._top(model)) is not None
            ]
            heapq.heapify(soonest)
            while soonest and excess > 0:
                _, model = heapq.heappop(soonest)
                item = self._top(model)
                assert item is not None
                orphaned += self._drop(model)
                evicted += 1
                excess -= 1
                self.floors[model] = max(self.floors.get(model, item), item)
                if (item := self._top(model)) is not None:
                    heapq.heappush(soonest, (self._time_left(model, item, watermarks), model))
        for model, (exp, _) in list(self.floors.items()):
            watermark = watermarks.get(model)
            if watermark is not None and exp <= watermark:
                del self.floors[model]
        return evicted, orphaned

    @staticmethod
    def _time_left(
        model: str, item: tuple[int, str], watermarks: dict[str, int]
    ) -> tuple[bool, int]:
        # Without a clock (all its inferences were too far in the future) the model's
        # entries would never expire: they go first.
        watermark = watermarks.get(model)
        return (False, 0) if watermark is None else (True, item[0] - watermark)

    def _top(self, model: str) -> tuple[int, str] | None:
        """The model's current item with the smallest ``(exp, join key)``, if any."""
        heap = self._heaps.get(model)
        while heap:
            exp, key = heap[0]
            entry = self._entries.get(key)
            if entry is not None and entry["exp"] == exp:
                return heap[0]
            heapq.heappop(heap)
        self._heaps.pop(model, None)
        return None

    def _drop(self, model: str) -> int:
        """Drop the entry of the model's top item; the feedback it orphans."""
        _, key = heapq.heappop(self._heaps[model])
        entry = self._entries.pop(key)
        left = self._per_model[model] - 1
        if left:
            self._per_model[model] = left
        else:
            del self._per_model[model]
        self._pending.discard(key)
        self._unwritten.pop(key, None)
        seq = self._segment_of.pop(key, None)
        if seq is not None:
            self._release(seq)
        return len(entry["fb"])

    def _release(self, seq: int) -> None:
        left = self._live[seq] - 1
        if left:
            self._live[seq] = left
        else:
            del self._live[seq], self._models_in[seq]
            self._dead.append(seq)

    def _compact(self) -> None:
        """Rebuild the heaps once stale items (left by extended entries) outnumber live ones."""
        if sum(len(heap) for heap in self._heaps.values()) <= 2 * len(self._entries) + 1024:
            return
        heaps: dict[str, list[tuple[int, str]]] = {}
        for key, entry in self._entries.items():
            heaps.setdefault(key.split(SEP, 1)[0], []).append((entry["exp"], key))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps

    # -- segment records ----------------------------------------------------------------
    def segments(self, max_bytes: int) -> list[tuple[int, Any]]:
        """The entries changed since the last call as new records ``(seq, value)``, each
        about ``max_bytes`` at most; the records they supersede may become dead."""
        records: list[tuple[int, Any]] = []
        chunk: dict[str, dict[str, Any]] = {}
        size = 0
        for key in self._unwritten:
            entry = self._entries[key]
            chunk[key] = _copy(entry)
            size += 256 * (1 + len(entry["fb"]))
            if entry["inf"] is not None:
                size += _text_chars(entry["inf"])
            if size >= max_bytes:
                records.append(self._record(chunk))
                chunk, size = {}, 0
        if chunk:
            records.append(self._record(chunk))
        self._unwritten = {}
        return records

    def _record(self, chunk: dict[str, dict[str, Any]]) -> tuple[int, Any]:
        seq = self._next_segment
        self._next_segment += 1
        self._live[seq] = len(chunk)
        self._models_in[seq] = {key.split(SEP, 1)[0] for key in chunk}
        for key in chunk:
            old = self._segment_of.get(key)
            self._segment_of[key] = seq
            if old is not None:
                self._release(old)
        return seq, {"e": chunk}

    def take_dead(self) -> list[int]:
        """Records that no longer hold a current entry, to delete (each reported once)."""
        dead, self._dead = sorted(self._dead), []
        return dead

    def forget(self, models: set[str]) -> None:
        """Forget ``models`` (without live entries): drop their floors, and write anew
        (next :meth:`segments`) the entries sharing a record with their dropped entries,
        which restore could no longer tell expired, so those records can go."""
        for model in models:
            self.floors.pop(model, None)
        stale = {seq for seq, found in self._models_in.items() if found & models}
        for key in sorted(key for key, seq in self._segment_of.items() if seq in stale):
            self._unwritten.setdefault(key, None)

    def restore(
        self,
        records: list[tuple[int, dict[str, dict[str, Any]]]],
        watermarks: dict[str, int],
        floors: dict[str, tuple[int, str]],
    ) -> None:
        """Rebuild from stored records ``(seq, entries)`` (see :func:`record_entries`; later
        records hold newer versions of an entry), dropping entries at or below their
        model's watermark or floor; records left without a live entry become dead."""
        self.floors = dict(floors)
        records = sorted(records, key=lambda record: record[0])
        for seq, entries in records:
            self._models_in[seq] = {key.split(SEP, 1)[0] for key in entries}
            for key, entry in entries.items():
                self._entries[key] = _copy(entry)
                self._segment_of[key] = seq
            self._next_segment = seq + 1
        for key, entry in list(self._entries.items()):
            model = key.split(SEP, 1)[0]
            watermark = watermarks.get(model)
            floor = self.floors.get(model)
            if (watermark is not None and entry["exp"] <= watermark) or (
                floor is not None and (entry["exp"], key) <= floor
            ):
                del self._entries[key], self._segment_of[key]
                continue
            seq = self._segment_of[key]
            self._live[seq] = self._live.get(seq, 0) + 1
            self._per_model[model] = self._per_model.get(model, 0) + 1
            self._heaps.setdefault(model, []).append((entry["exp"], key))
            if entry["fb"]:
                self._pending.add(key)
        for heap in self._heaps.values():
            heapq.heapify(heap)
        for seq, _ in records:
            if seq not in self._live:
                del self._models_in[seq]
                self._dead.append(seq)


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "fb": list(entry["fb"]), "seen": list(entry["seen"])}
