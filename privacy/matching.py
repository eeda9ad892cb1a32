"""What a data subject's text looks like wherever genmon copied it, and how it is blanked.

An erasure or export starts from the subject's ``labelled_example`` rows: their request
ids and their texts (prompt, response, correction, chat turns). Copies of those texts
reach other places in three shapes, each matched its own way:

- **affected-example clusters** in findings' evidence, incident snapshots and notification
  payloads (``{"representatives": [...], "request_ids": [...], "subject_ids": [...]}``,
  :mod:`genmon.streams.detection.error_evidence`): a representative is the display text of
  one example, cut to fit, so it is matched by *position*: its request id or subject id;
- **whole strings** anywhere in a JSON or text column (a gate sample's prompt, an
  operator's note, a truncated snapshot's JSON excerpt): a string holding one of the
  subject's texts (whitespace collapsed, also as genmon's redactor and JSON escaping
  would have stored it), one of its request ids, or its subject id;
- **dataset examples** (:mod:`genmon.privacy.datasets`): by ``subject_id``, or by
  request id for datasets built before examples carried one.

A matched string is replaced whole by :data:`ERASED`: the structure (an incident, its
cluster sizes) stays and only the content goes. Texts shorter than
:data:`MIN_NEEDLE_CHARS` match only a string equal to them, so erasing a subject who
asked "thanks!" blanks no one else's text that contains the word.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genmon.schemas.redact import redact, stored_subject_id

#: What replaces an erased text (or id) in a JSON document or a text column.
ERASED = "[erased: data subject]"
#: Texts shorter than this (after collapsing whitespace) match equal strings only.
MIN_NEEDLE_CHARS = 12
#: Ids shorter than this match equal strings only, never a substring of a longer one.
MIN_ID_CHARS = 8
#: Keys of an affected-example cluster whose items line up with its representatives.
CLUSTER_KEYS = ("representatives", "request_ids", "subject_ids")


def subject_hash(subject_id: str) -> str:
    """sha256 of the subject id: what the audit keeps instead of the id."""
    return hashlib.sha256(subject_id.encode("utf-8")).hexdigest()


def stored_subject_ids(subject_id: str) -> set[str]:
    """The forms a window exemplar may hold ``subject_id`` in: as it is, and as the
    examples store it (:func:`~genmon.schemas.redact.stored_subject_id`, a digest when its
    JSON is longer than an id)."""
    return {subject_id, stored_subject_id(subject_id)}


def normal(text: str) -> str:
    """``text`` with runs of whitespace collapsed to one space and the ends trimmed."""
    return " ".join(text.split())


def texts_of(row: Any) -> list[str]:
    """A labelled example's texts: prompt, response, correction and chat turns."""
    found = [row.prompt or "", row.response or "", row.correction or ""]
    for turn in row.messages or []:
        if isinstance(turn, Mapping) and isinstance(turn.get("content"), str):
            found.append(turn["content"])
    return [text for text in found if text.strip()]


@dataclass
class SubjectMatcher:
    """Decides whether a string or an example is the subject's."""

    subject_ids: set[str] = field(default_factory=set)
    request_ids: set[str] = field(default_factory=set)
    needles: set[str] = field(default_factory=set)
    """Texts of at least :data:`MIN_NEEDLE_CHARS`, in every stored form."""
    exact: set[str] = field(default_factory=set)
    """Shorter texts, matched only by an equal string."""
    _pattern: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_subject(cls, subject_id: str) -> SubjectMatcher:
        return cls(subject_ids=stored_subject_ids(subject_id))

    def add_text(self, text: str) -> None:
        self._pattern = None
        plain = normal(text)
        if not plain:
            return
        if len(plain) < MIN_NEEDLE_CHARS:
            self.exact.add(plain)
            return
        for form in {plain, normal(redact(text))}:
            if len(form) >= MIN_NEEDLE_CHARS:
                self.needles.add(form)
                self.needles.add(json.dumps(form)[1:-1])  # as a JSON excerpt holds it

    def add_row(self, row: Any) -> None:
        """Take a labelled example's request id and texts."""
        self._pattern = None
        self.request_ids.add(row.request_id)
        for text in texts_of(row):
            self.add_text(text)

    def add_rows(self, rows: Iterable[Any]) -> None:
        for row in rows:
            self.add_row(row)

    @property
    def empty(self) -> bool:
        """Nothing but the subject id to look for (no rows left: erased already)."""
        return not (self.request_ids or self.needles or self.exact)

    def is_id(self, value: Any) -> bool:
        return isinstance(value, str) and (value in self.request_ids or value in self.subject_ids)

    def hits(self, text: str) -> bool:
        """Whether ``text`` holds the subject's text or names one of its ids."""
        if text in self.request_ids or text in self.subject_ids:
            return True
        plain = normal(text)
        if plain in self.exact:
            return True
        pattern = self._compiled()
        return pattern is not None and (
            pattern.search(plain) is not None or pattern.search(text) is not None
        )

    def _compiled(self) -> re.Pattern[str] | None:
        """One alternation of the needles and the long ids (longest first): a string is
        searched once, however many texts the subject has."""
        if self._pattern is None:
            ids = {i for i in (*self.request_ids, *self.subject_ids) if len(i) >= MIN_ID_CHARS}
            parts = sorted(self.needles | ids, key=lambda p: (-len(p), p))
            if not parts:
                return None
            self._pattern = re.compile("|".join(re.escape(p) for p in parts))
        return self._pattern

    def example_hits(self, example: Mapping[str, Any]) -> bool:
        """Whether a dataset example (``SftExample.to_json()``) came from the subject."""
        if example.get("subject_id") in self.subject_ids:
            return True
        return bool(example.get("request_id")) and example.get("request_id") in self.request_ids


# -- scrubbing JSON -----------------------------------------------------------------------
def scrub(value: Any, matcher: SubjectMatcher) -> tuple[Any, int]:
    """``value`` (JSON, or a plain string) with the subject's content replaced by
    :data:`ERASED`, and how many items were replaced. ``value`` itself is not changed."""
    if isinstance(value, str):
        return (ERASED, 1) if matcher.hits(value) else (value, 0)
    if isinstance(value, list):
        out, total = [], 0
        for item in value:
            new, count = scrub(item, matcher)
            out.append(new)
            total += count
        return out, total
    if isinstance(value, dict):
        if _is_cluster(value):
            return _scrub_cluster(value, matcher)
        result: dict[str, Any] = {}
        total = 0
        for key, item in value.items():
            result[key], count = scrub(item, matcher)
            total += count
        return result, total
    return value, 0


def _is_cluster(value: Mapping[str, Any]) -> bool:
    return isinstance(value.get("representatives"), list) and (
        isinstance(value.get("request_ids"), list) or isinstance(value.get("subject_ids"), list)
    )


def _scrub_cluster(cluster: Mapping[str, Any], matcher: SubjectMatcher) -> tuple[Any, int]:
    """A cluster whose examples of the subject (by request or subject id at the same
    position, or by text) are blanked in every list that lines up with them."""
    out = dict(cluster)
    lists = {key: list(cluster.get(key) or []) for key in CLUSTER_KEYS}
    total = 0
    for index, text in enumerate(lists["representatives"]):
        ids = [lists[key][index] for key in CLUSTER_KEYS[1:] if index < len(lists[key])]
        if any(matcher.is_id(i) for i in ids) or (isinstance(text, str) and matcher.hits(text)):
            total += 1
            for key in CLUSTER_KEYS:
                if index < len(lists[key]):
                    lists[key][index] = None if key == "subject_ids" else ERASED
    for key in CLUSTER_KEYS:
        if key in cluster:
            out[key] = lists[key]
    for key, item in cluster.items():
        if key not in CLUSTER_KEYS:
            out[key], count = scrub(item, matcher)
            total += count
    # ids beyond the representatives (or without them) are blanked one by one
    for key in CLUSTER_KEYS[1:]:
        for index, item in enumerate(out.get(key) or []):
            if matcher.is_id(item):
                out[key][index] = None if key == "subject_ids" else ERASED
                total += 1
    return out, total


def found_in(value: Any, matcher: SubjectMatcher) -> list[Any]:
    """The pieces of ``value`` that are the subject's (for an export): matching strings,
    and ``{representative, request_id}`` of clusters' examples that are theirs."""
    found: list[Any] = []
    if isinstance(value, str):
        if matcher.hits(value):
            found.append(value)
    elif isinstance(value, list):
        for item in value:
            found.extend(found_in(item, matcher))
    elif isinstance(value, dict):
        if _is_cluster(value):
            reps = value.get("representatives") or []
            request_ids = value.get("request_ids") or []
            subject_ids = value.get("subject_ids") or []
            for index, text in enumerate(reps):
                rid = request_ids[index] if index < len(request_ids) else None
                sid = subject_ids[index] if index < len(subject_ids) else None
                if matcher.is_id(rid) or matcher.is_id(sid) or matcher.hits(str(text)):
                    found.append({"representative": text, "request_id": rid})
            return found
        for item in value.values():
            found.extend(found_in(item, matcher))
    return found
