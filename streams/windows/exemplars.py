"""Affected examples of a window: small, mergeable samples per failure signal.

When a quality or feedback detector fires, on-call needs to see *what* went wrong, not only
that a rate went up. Every pane therefore keeps, per signal, at most
``detectors.exemplars_per_window`` of the examples that signal counted:

=====================  ============================================  ===================
signal                 counted when                                  kept in series
=====================  ============================================  ===================
``error``              status ``error`` or ``timeout``               ``*``
``refusal``            an answered (non-error) response matches a    ``*``
                       refusal phrase
``empty``              an answered (non-error) response is empty     ``*``
``truncated``          finish reason ``length`` (or status)          ``*``
``negative_feedback``  a joined feedback scored negative             every segment series
=====================  ============================================  ===================

The sample is a *bottom-k* sample (Cohen & Kaplan, "Summarizing data using bottom-k
sketches", PODC 2007): each example gets a pseudo-random priority from a keyed hash of
its request id, and the ``k`` lowest priorities are kept. That is a uniform sample without
replacement that merges exactly (the bottom ``k`` of a union is the bottom ``k`` of the
parts' bottom ``k``), so pane samples merge into window samples like the other
aggregates, and a replay keeps the same examples. Only flagged events are hashed.

Each example is its request id, prompt and response cut to :data:`TEXT_CHARS`, segment
label cut to :data:`SEGMENT_CHARS`, a note (error code, or feedback label and
correction) cut to :data:`NOTE_CHARS` and the event's pseudonymous subject id (``None``
when it has none), so an erasure by subject id finds the example: compare
:func:`stored_subject_id` of the id with ``subject_id``. With ``redact`` (the setting
``detectors.redact_exemplars``) prompt, response and note are redacted
(:func:`genmon.schemas.redact.redact`: emails, phones, cards, API keys) when the example
is taken, so window records, findings and incident snapshots never hold the raw text;
only examples that enter the sample pay for it. An example whose JSON is still over
:data:`EXAMPLE_MAX_BYTES` (non-ASCII text takes up to 6 bytes a character) has its longest
texts cut further. With at most 64 examples per signal a pane record so holds at most
``5 x 64 x 1280`` bytes (400 KiB) of examples, 200 KiB at the default 32. A closed window's
record carries them under ``exemplars`` (tumbling windows only: the runner judges those),
trimmed to :data:`WINDOW_BUDGET_BYTES` in total so the record stays well under Kafka's
1 MB.

>>> reservoirs = Exemplars(2)
>>> for i in range(10):
...     reservoirs.offer("refusal", f"r{i}", "mail me: a@b.io", "I can't", "*", "", f"u{i}")
>>> merged = Exemplars(2).merge(reservoirs).merge(reservoirs)  # merging is idempotent
>>> [e["request_id"] for e in merged.records()["refusal"]] == [
...     e["request_id"] for e in reservoirs.records()["refusal"]]
True
>>> example = reservoirs.records()["refusal"][0]
>>> example["prompt"], example["subject_id"] == "u" + example["request_id"][1:]
('mail me: [REDACTED:email]', True)
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
from typing import Any, TypedDict

from genmon.schemas.redact import redact as redact_text
from genmon.schemas.redact import stored_subject_id

#: Signals that keep examples (see the table above).
SIGNALS = ("error", "refusal", "empty", "truncated", "negative_feedback")
#: Prompt and response are each cut to this many characters.
TEXT_CHARS = 200
SEGMENT_CHARS = 200
NOTE_CHARS = 120
#: Redaction reads at most this many times the characters a text keeps (see _redacted).
REDACT_READ_FACTOR = 4
#: Most bytes of one example as JSON: an all-ASCII example cut as above, with request and
#: subject ids of MAX_ID_CHARS, fits (1273 bytes).
EXAMPLE_MAX_BYTES = 1280
#: Most bytes (as JSON) the examples of one closed window record may take.
WINDOW_BUDGET_BYTES = 256 * 1024
#: Key of the priority hash: fixed, so every worker and every replay picks the same examples.
_HASH_KEY = b"genmon-exemplars-v1"

# A stored example: [priority, request_id, prompt, response, segment label, note,
# subject id or None].
Example = list[Any]


class ExampleRecord(TypedDict):
    """One example as a closed window carries it."""

    request_id: str
    prompt: str
    response: str
    segment: str
    note: str
    subject_id: str | None


def priority(signal: str, request_id: str) -> int:
    """The example's pseudo-random rank in [0, 2^48): a keyed hash of signal and request id."""
    digest = hashlib.blake2b(
        f"{signal}\x1f{request_id}".encode(), digest_size=6, key=_HASH_KEY
    ).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=256)
def _redacted(text: str, keep: int) -> str:
    """``text`` redacted, then cut to ``keep`` characters (cached: one negative feedback
    offers the same texts to the pane of every segment series it counts in).

    Redaction reads at most ``REDACT_READ_FACTOR * keep`` characters (its cost grows with
    the square of a long run of address characters), cut at the last space or newline
    past ``keep`` if there is one, so the cut splits no email or key (they hold none).
    Beyond that it splits a secret only in a text without such a break, and the fragment
    shows only if the redactions before it shortened the text below ``keep``.
    """
    read = REDACT_READ_FACTOR * keep
    if len(text) > read:
        text = text[:read]
        space = max(text.rfind(" "), text.rfind("\n"))
        if space >= keep:
            text = text[:space]
    return redact_text(text)[:keep]


class Exemplars:
    """Bottom-``capacity`` samples of affected examples, one per signal."""

    __slots__ = ("_heaps", "capacity", "redact")

    def __init__(self, capacity: int, redact: bool = True) -> None:
        """``redact``: redact prompt, response and note of the examples taken."""
        if capacity < 1:
            raise ValueError(f"detectors.exemplars_per_window must be >= 1 here, got {capacity}")
        self.capacity = capacity
        self.redact = redact
        # Max-heaps on priority (negated): the root is the example to drop first.
        self._heaps: dict[str, list[tuple[int, str, Example]]] = {}

    def __bool__(self) -> bool:
        return any(self._heaps.values())

    def offer(
        self,
        signal: str,
        request_id: str,
        prompt: str,
        response: str,
        segment: str,
        note: str,
        subject_id: str | None = None,
    ) -> None:
        rank = priority(signal, request_id)
        heap = self._heaps.setdefault(signal, [])
        if len(heap) >= self.capacity and -heap[0][0] <= rank:
            return  # the common case once full: nothing is cut, redacted or copied
        if self.redact:
            texts = [_redacted(t, n) for t, n in ((prompt, TEXT_CHARS), (response, TEXT_CHARS))]
            note = _redacted(note, NOTE_CHARS)
        else:
            texts = [prompt[:TEXT_CHARS], response[:TEXT_CHARS]]
            note = note[:NOTE_CHARS]
        example: Example = [
            rank,
            request_id,
            *texts,
            segment[:SEGMENT_CHARS],
            note,
            None if subject_id is None else stored_subject_id(subject_id),
        ]
        self._push(heap, _within_bytes(example))

    def _push(self, heap: list[tuple[int, str, Example]], example: Example) -> None:
        rank, request_id = int(example[0]), str(example[1])
        # One request is one example (several negative feedbacks on one answer, or a pane
        # merged twice): the same request always has the same priority.
        if any(item[1] == request_id and -item[0] == rank for item in heap):
            return
        item = (-rank, request_id, example)
        if len(heap) < self.capacity:
            heapq.heappush(heap, item)
        elif item > heap[0]:  # a lower priority than the current worst kept
            heapq.heapreplace(heap, item)

    def merge(self, other: Exemplars | None) -> Exemplars:
        if other is None:
            return self
        for signal, items in other._heaps.items():
            heap = self._heaps.setdefault(signal, [])
            for _, _, example in items:
                self._push(heap, example)
        return self

    def to_state(self) -> dict[str, list[Example]]:
        return {signal: [item[2] for item in heap] for signal, heap in self._heaps.items() if heap}

    @classmethod
    def from_state(
        cls, capacity: int, state: dict[str, list[Example]], redact: bool = True
    ) -> Exemplars:
        """Rebuild from :meth:`to_state`; a lowered ``capacity`` keeps the lowest priorities."""
        made = cls(capacity, redact)
        for signal, examples in state.items():
            # A stored sample is already one example per request: no need to re-check.
            heap = [(-int(example[0]), str(example[1]), example) for example in examples]
            if len(heap) > capacity:
                heap = heapq.nlargest(capacity, heap)
            heapq.heapify(heap)
            made._heaps[signal] = heap
        return made

    def records(self) -> dict[str, list[ExampleRecord]]:
        """The examples per signal as they go into a closed window, lowest priority first."""
        out: dict[str, list[ExampleRecord]] = {}
        for signal, heap in sorted(self._heaps.items()):
            if heap:
                out[signal] = [_record(example) for _, _, example in sorted(heap, reverse=True)]
        return out


def _record(example: Example) -> ExampleRecord:
    _, request_id, prompt, response, segment, note, subject_id = example
    return {
        "request_id": request_id,
        "prompt": prompt,
        "response": response,
        "segment": segment,
        "note": note,
        "subject_id": subject_id,
    }


def _within_bytes(example: Example) -> Example:
    """``example`` with its longest texts halved until its JSON fits EXAMPLE_MAX_BYTES.

    The request and subject ids are never cut (on-call finds the request by its id, an
    erasure the example by its subject's); request ids are at most MAX_ID_CHARS
    characters, stored subject ids at most SUBJECT_MAX_BYTES bytes.
    """
    while len(json.dumps(example)) > EXAMPLE_MAX_BYTES:
        longest = max(range(2, 6), key=lambda i: len(json.dumps(example[i])))
        if not example[longest]:
            break
        example[longest] = example[longest][: len(example[longest]) // 2]
    return example


def fit_window_budget(
    series: list[dict[str, Any]], budget: int = WINDOW_BUDGET_BYTES
) -> list[dict[str, Any]]:
    """Cut every ``series[i]["exemplars"]`` list to a common length so all fit in ``budget``.

    Lists are in priority order, so a shorter prefix is still a uniform sample. Returns
    ``series`` (changed in place).
    """
    lists = [examples for s in series for examples in s.get("exemplars", {}).values()]
    if not lists:
        return series
    sizes = [[len(json.dumps(example)) + 2 for example in examples] for examples in lists]
    keep = max(len(examples) for examples in lists)
    while keep > 0 and sum(sum(s[:keep]) for s in sizes) > budget:
        keep = keep * 3 // 4
    for s in series:
        exemplars = s.get("exemplars")
        if exemplars is None:
            continue
        for signal in list(exemplars):
            exemplars[signal] = exemplars[signal][:keep]
            if not exemplars[signal]:
                del exemplars[signal]
        if not exemplars:
            del s["exemplars"]
    return series
