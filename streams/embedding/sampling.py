"""Sampling for the embedding stage: which texts get encoded, and their reassembly.

Pure logic, no Faust and no I/O, so the worker (:mod:`genmon.streams.embedding.stage`)
and ``genmon replay`` share it:

* **Sampling** (:class:`Sampler`). Each ``prompt``/``response`` (``embedding.fields``) of
  a valid inference is kept with probability ``rate`` and then offered to a reservoir
  (Vitter's algorithm R, :class:`Reservoir`) per model, version and field for the current
  *slot*: ``embedding.flush_interval_s`` of the model's event time (by when the call
  completed) on a fixed grid. So drift is judged every few seconds, not when a 60 s
  window closes, and a sub-sample is uniform over its slot and bounded whatever the
  traffic: ``embedding.reservoir_per_window`` texts per window, spread over its slots
  (:func:`slot_capacity`). A slot ends when the model's newest event time passes its end
  (no lateness wait: a late text joins the open slot, which only moves it a few seconds),
  or when the model has been idle ``windows.idle_timeout_s`` and the wall clock passes
  it. Its reservoirs then become :class:`EmbedRequest` messages, one per text, each
  carrying the sub-sample's id, index and size. A slot's end is later than every earlier
  one of its model, so a series never sees two sub-samples with one end.
* **Rate control** (:class:`RateController`): the sample rate under the encoder's
  backlog, AIMD: above ``embedding.max_backlog`` it halves (down to
  ``embedding.min_sample_rate``); once the backlog is at most one encoder batch it grows
  back by a tenth of ``embedding.sample_rate`` per check.
* **Reassembly** (:class:`SampleAssembler`): the encoder side collects encoded texts
  until each sub-sample is whole (a :class:`SubSample`, embeddings and texts in the same
  order); one missing texts after ``embedding.group_timeout_s`` (its producer or encoder
  restarted mid-sample) goes as it is, and one seen again after a redelivery is skipped.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

import numpy as np

from genmon.exceptions import ConfigurationError
from genmon.schemas.events import InferenceEvent
from genmon.settings import Settings

#: Additive increase per backlog check, as a share of ``embedding.sample_rate``.
RATE_INCREASE_SHARE = 0.1
#: Multiplicative decrease when the backlog is too long.
RATE_DECREASE_FACTOR = 0.5
#: Sample ids remembered so that a redelivered sample is not submitted twice.
SUBMITTED_MEMORY = 10_000

T = TypeVar("T")


# -- wire format -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedRequest:
    """One sampled text of one sub-sample, as written to the request topic.

    ``window_start`` and ``window_end`` bound the sub-sample's slot (the names predate
    slots; the wire format is unchanged, so requests queued by an older worker decode).
    """

    sample_id: str
    model_id: str
    model_version: str
    field: str
    window_start: datetime
    window_end: datetime
    index: int
    count: int
    text: str

    def to_bytes(self) -> bytes:
        document = {
            **self.__dict__,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
        }
        return json.dumps(document, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> EmbedRequest:
        """Decode one message; ``ValueError`` says what is wrong with it."""
        try:
            document = json.loads(raw or b"")
            request = cls(
                **{
                    **document,
                    "window_start": datetime.fromisoformat(document["window_start"]),
                    "window_end": datetime.fromisoformat(document["window_end"]),
                }
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"not an embedding request: {exc}") from exc
        if not 0 <= request.index < request.count:
            raise ValueError(f"index {request.index} outside a sample of {request.count}")
        return request


# -- sampling ----------------------------------------------------------------------------------
class Reservoir(Generic[T]):
    """A uniform random sample of at most ``capacity`` items of a stream (algorithm R).

    After ``n`` offers every offered item is in the sample with probability
    ``min(1, capacity / n)``, in O(capacity) memory.

    >>> reservoir = Reservoir(3, random.Random(0))
    >>> for item in range(100):
    ...     reservoir.offer(item)
    >>> len(reservoir.items), reservoir.seen
    (3, 100)
    """

    def __init__(self, capacity: int, rng: random.Random) -> None:
        if capacity < 1:
            raise ConfigurationError(f"a reservoir needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.items: list[T] = []
        self.seen = 0
        self._rng = rng

    def offer(self, item: T) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.items[slot] = item


class RateController:
    """Sample rate under encoder backpressure: additive increase, multiplicative decrease.

    >>> control = RateController(max_rate=0.4, min_rate=0.01, max_backlog=100, caught_up=10)
    >>> [round(control.observe(b), 2) for b in (500, 500, 50, 0, 0)]
    [0.2, 0.1, 0.1, 0.14, 0.18]
    """

    def __init__(
        self,
        max_rate: float,
        min_rate: float,
        max_backlog: int,
        caught_up: int,
        increase: float | None = None,
        decrease: float = RATE_DECREASE_FACTOR,
    ) -> None:
        if not 0.0 <= min_rate <= max_rate <= 1.0:
            raise ConfigurationError(
                f"sample rates must satisfy 0 <= min ({min_rate}) <= max ({max_rate}) <= 1"
            )
        if not 0.0 < decrease < 1.0:
            raise ConfigurationError(f"rate decrease factor must be in (0, 1), got {decrease}")
        self.max_rate, self.min_rate = max_rate, min_rate
        self.max_backlog, self.caught_up = max_backlog, caught_up
        self.increase = max_rate * RATE_INCREASE_SHARE if increase is None else increase
        self.decrease = decrease
        self.rate = max_rate

    def observe(self, backlog: int) -> float:
        """Adjust the rate to the encoder's current backlog (texts waiting) and return it."""
        if backlog > self.max_backlog:
            self.rate = max(self.min_rate, self.rate * self.decrease)
        elif backlog <= self.caught_up:
            self.rate = min(self.max_rate, self.rate + self.increase)
        return self.rate


@dataclass
class _ModelSlots:
    """One model's open sub-samples: a reservoir per (version, field) for the open slot
    of the model's event-time grid, and the sub-samples of slots that have ended."""

    watermark: float = -math.inf
    last_arrival: float = -math.inf
    slot_end: float = -math.inf  # end of the open slot (-inf: none open)
    reservoirs: dict[tuple[str, str], Reservoir[str]] = field(default_factory=dict)
    ended: list[tuple[float, str, str, Reservoir[str]]] = field(default_factory=list)

    def end_slot(self) -> None:
        """The open slot's reservoirs become ended sub-samples."""
        for (version, name), reservoir in self.reservoirs.items():
            self.ended.append((self.slot_end, version, name, reservoir))
        self.reservoirs = {}
        self.slot_end = -math.inf


class Sampler:
    """Bernoulli sampling then one bounded reservoir per model, version, field and slot.

    Pure logic and no I/O: :meth:`offer` takes valid inferences, :meth:`due` returns the
    requests of the sub-samples whose slot has ended. ``rate`` may be changed at any time.
    ``dropped`` counts texts left out, by reason (``rate``, ``reservoir``, ``future``);
    ``queued`` counts texts returned by :meth:`due`.
    """

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        embedding, windows = settings.embedding, settings.windows
        self.fields = list(embedding.fields)
        self.slot = embedding.flush_interval_s
        self.capacity = slot_capacity(settings)
        self.max_chars = embedding.max_text_chars
        self.idle = windows.idle_timeout_s
        self.max_skew = windows.max_future_skew_s
        self.forget_after = windows.expires_s
        self.rate = embedding.sample_rate
        self.dropped: Tally[str] = Tally()
        self.queued = 0
        self._rng = rng or random.Random()
        self._models: dict[str, _ModelSlots] = {}

    def offer(self, events: Iterable[InferenceEvent], now: float) -> None:
        """Sample the texts of ``events`` (``now``: wall clock, epoch seconds)."""
        for event in events:
            texts = [(f, getattr(event, f)) for f in self.fields if getattr(event, f)]
            if not texts:
                continue
            at = event.started_at.timestamp() + event.latency_ms / 1000  # when it completed
            if at > now + self.max_skew:
                self.dropped["future"] += len(texts)
                continue
            state = self._models.setdefault(event.model_id, _ModelSlots())
            state.last_arrival = now
            state.watermark = max(state.watermark, at)
            if state.watermark >= state.slot_end:
                state.end_slot()  # (nothing when none is open)
                state.slot_end = (math.floor(state.watermark / self.slot) + 1) * self.slot
            for name, text in texts:
                if self._rng.random() >= self.rate:
                    self.dropped["rate"] += 1
                    continue
                key = (event.model_version, name)
                reservoir = state.reservoirs.get(key)
                if reservoir is None:
                    reservoir = state.reservoirs[key] = Reservoir(self.capacity, self._rng)
                reservoir.offer(text[: self.max_chars])

    def due(self, now: float) -> list[EmbedRequest]:
        """Requests of every sub-sample whose slot has ended by ``now``, oldest first."""
        requests: list[EmbedRequest] = []
        for model_id in list(self._models):
            state = self._models[model_id]
            if now - state.last_arrival >= self.idle:
                # An idle model's watermark advances with the clock (as its windows' do), so
                # a straggler after the idle close starts a later slot, never a repeated one.
                state.watermark = max(state.watermark, now)
            if state.watermark >= state.slot_end:
                state.end_slot()
            for end, version, name, reservoir in sorted(state.ended, key=lambda e: e[:3]):
                requests += self._requests(model_id, version, name, end, reservoir)
            state.ended = []
            if not state.reservoirs and now - state.last_arrival > self.forget_after:
                del self._models[model_id]
        self.queued += len(requests)
        return requests

    def _requests(
        self, model_id: str, version: str, name: str, end: float, reservoir: Reservoir[str]
    ) -> list[EmbedRequest]:
        self.dropped["reservoir"] += reservoir.seen - len(reservoir.items)
        sample_id = uuid.uuid4().hex
        start = datetime.fromtimestamp(end - self.slot, UTC)
        stop = datetime.fromtimestamp(end, UTC)
        count = len(reservoir.items)
        return [
            EmbedRequest(sample_id, model_id, version, name, start, stop, i, count, text)
            for i, text in enumerate(reservoir.items)
        ]

    @property
    def open_reservoirs(self) -> int:
        return sum(len(state.reservoirs) for state in self._models.values())

    def open_models(self) -> set[str]:
        """Models with a sub-sample still being collected (or ended and not yet flushed)."""
        return {model for model, state in self._models.items() if state.reservoirs or state.ended}


def slot_capacity(settings: Settings) -> int:
    """Most texts of one sub-sample: ``embedding.reservoir_per_window`` spread over the
    window's slots (at least one), so a window's texts stay within the setting."""
    embedding = settings.embedding
    share = embedding.flush_interval_s / settings.windows.tumbling_s
    return max(1, math.floor(embedding.reservoir_per_window * share))


# -- reassembly on the encoder side ------------------------------------------------------------
@dataclass(frozen=True)
class SubSample:
    """One slot's encoded sub-sample, ready for the drift detector: row ``i`` of
    ``embeddings`` is ``texts[i]``."""

    model_id: str
    model_version: str
    field: str
    start: datetime
    end: datetime
    embeddings: np.ndarray
    texts: tuple[str, ...]
    complete: bool


@dataclass
class _Partial:
    first: EmbedRequest
    arrived: float
    rows: dict[int, tuple[np.ndarray, str]] = field(default_factory=dict)


class SampleAssembler:
    """Collects encoded texts until each sub-sample is whole (or waited too long).

    Memory: the texts and vectors of the sub-samples in flight, and the last
    :data:`SUBMITTED_MEMORY` sample ids, so a redelivered sub-sample is skipped.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._partial: dict[str, _Partial] = {}
        self._submitted: OrderedDict[str, None] = OrderedDict()

    def add(
        self, requests: Sequence[EmbedRequest], vectors: np.ndarray, now: float
    ) -> list[SubSample]:
        """Add encoded ``requests`` (row ``i`` of ``vectors`` is request ``i``)."""
        done: list[SubSample] = []
        for request, vector in zip(requests, vectors, strict=True):
            if request.sample_id in self._submitted:
                continue
            partial = self._partial.get(request.sample_id)
            if partial is None:
                partial = self._partial[request.sample_id] = _Partial(request, now)
            partial.rows[request.index] = (vector, request.text)
            if len(partial.rows) == request.count:
                done.append(self._finish(request.sample_id, complete=True))
        return done

    def expired(self, now: float) -> list[SubSample]:
        """Sub-samples that waited ``timeout_s`` for missing texts, as they are."""
        late = [sid for sid, p in self._partial.items() if now - p.arrived >= self.timeout_s]
        return [self._finish(sid, complete=False) for sid in late]

    @property
    def pending(self) -> int:
        return len(self._partial)

    def _finish(self, sample_id: str, *, complete: bool) -> SubSample:
        partial = self._partial.pop(sample_id)
        self._submitted[sample_id] = None
        if len(self._submitted) > SUBMITTED_MEMORY:
            self._submitted.popitem(last=False)
        first = partial.first
        rows = [partial.rows[i] for i in sorted(partial.rows)]
        return SubSample(
            first.model_id,
            first.model_version,
            first.field,
            first.window_start,
            first.window_end,
            np.stack([vector for vector, _ in rows]).astype(np.float32, copy=False),
            tuple(text for _, text in rows),
            complete,
        )
