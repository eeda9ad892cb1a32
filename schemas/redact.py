"""Keep personal data and credentials out of what genmon stores and sends.

:func:`redact` replaces emails, phone numbers, card-like numbers (only those passing the
Luhn check) and API-key-like strings by ``[REDACTED:<what>]``. Two places use it:

- notifications (:class:`Redactor`, ``notify.redact``): texts are cut to
  ``max_text_chars`` and redacted when a notification is queued, so the outbox never
  stores the raw text either;
- affected examples (:mod:`genmon.streams.windows.exemplars`, ``detectors.redact_exemplars``):
  prompt, response and note are redacted when an example is taken, so window records,
  findings and incident snapshots never hold the raw text.

genmon's own ids (incident ids, fingerprints, finding ids: 32 hex characters) look like
long tokens, and an id's digits can pass for a card number; on-call needs them to find
the incident. Callers pass the ids they put into a text as ``keep``: a string of
``keep`` that stands alone (no token character or ``@`` either side) is left as it is
and the text around it is redacted as usual. So a secret next to an id is still caught,
and one that contains an id (``sk-<id>``) is caught whole.

The email and long-token rules try every start in a run of address or token characters:
quadratic in the run's length (20,000 characters take 0.4 s and 3 s here), so callers
redact bounded texts: :class:`Redactor` reads ``max_text_chars`` plus
:data:`CUT_MARGIN_CHARS`, the examples four times what they keep.

>>> r = Redactor(max_text_chars=80)
>>> r.text("mail bob@example.com, card 4111 1111 1111 1111, key sk-abcdefghijklmnopqrstuvwx")
'mail [REDACTED:email], card [REDACTED:card], key [REDACTED:api_key]'
>>> r.text("order 1234 5678 9012 3456")  # fails Luhn: not a card
'order 1234 5678 9012 3456'
>>> incident = "4111111111111111a0b1c2d3e4f5a6b7"
>>> r.text(f"related {incident}, key sk-abcdefghijklmnopqrstuvwx", keep={incident})
'related 4111111111111111a0b1c2d3e4f5a6b7, key [REDACTED:api_key]'
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Collection
from typing import Any

from genmon.schemas.events import MAX_ID_CHARS

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_API_KEY = re.compile(
    r"\b(?:"
    r"sk-[A-Za-z0-9_-]{16,}"  # OpenAI-style
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}"  # long mixed tokens
    r")"
)
#: Characters of a token (an API key, a long id) or an email address: a kept string must
#: have none either side, so it is never a piece of a longer secret.
_ATTACHED = "A-Za-z0-9_@-"
#: Characters past the cut that :meth:`Redactor.text` still reads, so that a secret
#: starting before the cut is recognised (the longest fixed-form key is 40 characters).
CUT_MARGIN_CHARS = 256
_MAX_DEPTH = 8
_MAX_ITEMS = 200


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[REDACTED:card]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    if _DATE.fullmatch(match.group()):
        return match.group()
    digits = re.sub(r"\D", "", match.group())
    return "[REDACTED:phone]" if 7 <= len(digits) <= 15 else match.group()


_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str] | str], ...] = (
    (_EMAIL, "[REDACTED:email]"),
    (_API_KEY, "[REDACTED:api_key]"),
    (_CARD, _card),
    (_PHONE, _phone),
)


def redact(text: str, keep: Collection[str] = ()) -> str:
    """``text`` with emails, API keys, Luhn-valid card numbers and phone numbers replaced.

    ``keep``: exact strings (genmon's own ids) left as they are where they stand alone;
    the text between them is redacted piece by piece.
    """
    kept = _kept_pattern(frozenset(keep)) if keep else None
    if kept is None:
        return _redact_all(text)
    # split() with one group puts the kept strings at the odd indices.
    parts = kept.split(text)
    return "".join(part if index % 2 else _redact_all(part) for index, part in enumerate(parts))


def _redact_all(text: str) -> str:
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


@functools.lru_cache(maxsize=256)
def _kept_pattern(keep: frozenset[str]) -> re.Pattern[str] | None:
    """Matches a string of ``keep`` standing alone; cached, as a payload's strings share it."""
    words = sorted(filter(None, keep), key=len, reverse=True)  # the longest of two overlaps
    if not words:
        return None
    alternatives = "|".join(map(re.escape, words))
    return re.compile(f"(?<![{_ATTACHED}])({alternatives})(?![{_ATTACHED}])")


def truncate(text: str, max_chars: int, unread: int = 0) -> str:
    """``text`` cut to ``max_chars`` characters, saying how much was cut.

    ``unread``: characters that followed ``text`` in its source and were never read; they
    count as cut too.
    """
    cut = max(len(text) - max_chars, 0) + unread
    if not cut:
        return text
    return f"{text[:max_chars]}…[+{cut} chars]"


class Redactor:
    """Truncates (always) and redacts (when ``enabled``) every string in a JSON value."""

    def __init__(self, *, enabled: bool = True, max_text_chars: int = 500) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        self.enabled = enabled
        self.max_text_chars = max_text_chars

    def text(self, value: str, keep: Collection[str] = ()) -> str:
        """``value`` redacted (but for the strings of ``keep``, see :func:`redact`) and cut."""
        if not self.enabled:
            return truncate(value, self.max_text_chars)
        # Redact before cutting, so a secret straddling the cut is caught whole, but only
        # what can show plus a margin: the rules are quadratic on long runs.
        read = value[: self.max_text_chars + CUT_MARGIN_CHARS]
        return truncate(redact(read, keep), self.max_text_chars, unread=len(value) - len(read))

    def scrub(self, value: Any, keep: Collection[str] = (), _depth: int = 0) -> Any:
        """A copy of ``value`` (JSON-like) with every string passed through :meth:`text`."""
        if isinstance(value, str):
            return self.text(value, keep)
        if _depth >= _MAX_DEPTH:
            return "[truncated: too deep]"
        if isinstance(value, dict):
            items = list(value.items())[:_MAX_ITEMS]
            return {str(k): self.scrub(v, keep, _depth + 1) for k, v in items}
        if isinstance(value, list | tuple):
            return [self.scrub(v, keep, _depth + 1) for v in list(value)[:_MAX_ITEMS]]
        return value


#: Most bytes of a stored subject id as JSON: any printable ASCII id (at most MAX_ID_CHARS)
#: is kept as it is, a longer one as its digest (:func:`stored_subject_id`).
SUBJECT_MAX_BYTES = MAX_ID_CHARS + 2


def stored_subject_id(subject_id: str) -> str:
    """How an affected example stores ``subject_id``: as it is, or a digest if its JSON is
    too long. One rule for the examples (:mod:`genmon.streams.windows.exemplars`) and for
    erasure, which must find them (:mod:`genmon.privacy.matching`).

    >>> stored_subject_id("user-42")
    'user-42'
    >>> stored_subject_id("ü" * 50)[:7]
    'sha256:'
    """
    if len(json.dumps(subject_id)) <= SUBJECT_MAX_BYTES:
        return subject_id
    return "sha256:" + hashlib.sha256(subject_id.encode()).hexdigest()
