"""Cheap per-response output-quality signals: empty, truncated, refusal, length, language.

Every function here is pure and runs in a few microseconds per response, because the
aggregator calls it for every event.

Refusal is genmon's one definition, :class:`genmon.detectors.quality.RefusalPhrases`
(the phrase list ``RefusalRateDetector`` uses too); a phrase file may replace or extend it.

Language ("language mix") is a heuristic, not a language-id model:

1. Only the first :data:`LANGUAGE_SCAN_CHARS` characters are looked at.
2. Letters are counted per Unicode script by code-point range. Kana -> ``ja``, Hangul ->
   ``ko``, Han without kana -> ``zh``, and ``ru`` (Cyrillic), ``ar`` (Arabic), ``hi``
   (Devanagari), ``el`` (Greek), ``he`` (Hebrew), ``th`` (Thai) by their scripts — so
   Ukrainian counts as ``ru`` and Persian as ``ar``: the label names the dominant script's
   most common language.
3. Latin-script text is told apart by counting very frequent function words of ``en``,
   ``es``, ``fr``, ``de``, ``pt``, ``it``; with no function word it is ``latin``.
4. No letters at all -> ``none``.

It is good enough to see a mix shift (a model suddenly answering French users in English),
not to label single short texts.

>>> detect_language("The cat is on the table and it is happy.")
'en'
>>> detect_language("Le chat est sur la table et il est content.")
'fr'
>>> detect_language("こんにちは、元気ですか")
'ja'
>>> signals = QualitySignals.default()
>>> signals.is_refusal("I'm sorry, but I can't help with that request.")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from genmon.detectors.quality import RefusalPhrases
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import FinishReason, InferenceEvent, InferenceStatus

LANGUAGE_SCAN_CHARS = 200

# Characters of a word (after lower-casing): function words count only as whole words.
_WORD_CHARS = "a-zà-ÿ'"
_WORD_LISTS = {
    "en": "the and is are was of to in it that you this with for not have be",
    "es": "el los las es y que en un una por con para está son del se no",
    "fr": "le les est et que un une des du dans pour avec sur il elle pas ce",
    "de": "der die das und ist nicht ein eine ich mit für auf sie es den zu",
    "pt": "o os as é e que um uma não com para em do da está são",
    "it": "il lo gli è e che un una non con per di della sono nel",
}
_FUNCTION_WORDS = {lang: frozenset(words.split()) for lang, words in _WORD_LISTS.items()}
_AMBIGUITY_ORDER = ("en", "es", "fr", "de", "pt", "it")
_LANGUAGES_OF_WORD: dict[str, tuple[str, ...]] = {}
for _lang in _AMBIGUITY_ORDER:
    for _word in _FUNCTION_WORDS[_lang]:
        _LANGUAGES_OF_WORD[_word] = (*_LANGUAGES_OF_WORD.get(_word, ()), _lang)
_ASCII_LETTERS = re.compile(r"[A-Za-z]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Finds exactly the whole words that are function words, in one C-level pass (looping over
# every word in Python cost more than the rest of the event's signals together).
_FUNCTION_WORD = re.compile(
    f"(?<![{_WORD_CHARS}])(?:"
    + "|".join(re.escape(word) for word in sorted(_LANGUAGES_OF_WORD, key=len, reverse=True))
    + f")(?![{_WORD_CHARS}])"
)


def _script(code: int) -> str | None:
    # Ordered by how common the script is in LLM traffic, so the usual case exits early.
    if code < 0x250:
        return "latin" if (0x41 <= code <= 0x5A or 0x61 <= code <= 0x7A or code >= 0xC0) else None
    if 0x3040 <= code <= 0x30FF:
        return "ja"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF:
        return "han"
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF:
        return "ko"
    if 0x400 <= code <= 0x4FF:
        return "ru"
    if 0x600 <= code <= 0x6FF:
        return "ar"
    if 0x900 <= code <= 0x97F:
        return "hi"
    if 0x370 <= code <= 0x3FF:
        return "el"
    if 0x590 <= code <= 0x5FF:
        return "he"
    if 0xE00 <= code <= 0xE7F:
        return "th"
    return None


def detect_language(text: str) -> str:
    """A language label for ``text`` (see the module docstring for the heuristic)."""
    head = text[:LANGUAGE_SCAN_CHARS]
    # Only non-ASCII characters need the per-character script lookup; ASCII letters are
    # counted by one regex pass (most traffic is ASCII, and this runs for every event).
    if head.isascii():
        # The usual case: Latin letters are the only script, so none need counting.
        if _ASCII_LETTERS.search(head) is None:
            return "none"
    else:
        counts: dict[str, int] = {}
        latin = len(_ASCII_LETTERS.findall(head))
        if latin:
            counts["latin"] = latin
        for char in _NON_ASCII.findall(head):
            script = _script(ord(char))
            if script is not None:
                counts[script] = counts.get(script, 0) + 1
        if not counts:
            return "none"
        if "ja" in counts:
            return "ja"
        best = max(counts, key=counts.__getitem__)
        if best == "han":
            return "zh"
        if best != "latin":
            return best
    hits = dict.fromkeys(_AMBIGUITY_ORDER, 0)
    for word in _FUNCTION_WORD.findall(head.lower()):
        for lang in _LANGUAGES_OF_WORD[word]:
            hits[lang] += 1
    top = max(_AMBIGUITY_ORDER, key=hits.__getitem__)
    return top if hits[top] else "latin"


@dataclass(frozen=True, slots=True)
class ResponseSignals:
    """The quality signals of one response."""

    empty: bool
    truncated: bool
    refusal: bool
    response_chars: int
    language: str


class QualitySignals:
    """Computes :class:`ResponseSignals`; refusals by a :class:`RefusalPhrases` list.

    The list is genmon's (the one ``RefusalRateDetector`` uses) unless a phrase file
    replaces or extends it (``GENMON_WINDOWS__REFUSAL_PHRASES_FILE``, see :meth:`from_file`).
    """

    def __init__(self, refusals: RefusalPhrases | None = None) -> None:
        self.refusals = refusals or RefusalPhrases.default()

    @classmethod
    def from_file(cls, path: Path | None = None) -> QualitySignals:
        """Load a phrase file (default: genmon's list, ``genmon.detectors.quality``'s)."""
        if path is None:
            return cls()
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read refusal phrase file {path}: {exc}; "
                "fix GENMON_WINDOWS__REFUSAL_PHRASES_FILE"
            ) from exc
        try:
            return cls(RefusalPhrases.from_yaml(text, str(path)))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc}; fix GENMON_WINDOWS__REFUSAL_PHRASES_FILE") from exc

    @classmethod
    def default(cls) -> QualitySignals:
        return cls()

    def is_refusal(self, response: str) -> bool:
        return self.refusals.is_refusal(response)

    def of(self, event: InferenceEvent) -> ResponseSignals:
        response = event.response
        empty = not response.strip()
        return ResponseSignals(
            empty=empty,
            truncated=event.status is InferenceStatus.TRUNCATED
            or event.finish_reason is FinishReason.LENGTH,
            refusal=not empty and self.refusals.is_refusal(response),
            response_chars=len(response),
            language="none" if empty else detect_language(response),
        )
