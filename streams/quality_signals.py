"""Cheap per-response output-quality signals: empty, truncated, refusal, length, language.

Every function here is pure and runs in a few microseconds per response, because the
aggregator calls it for every event.

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
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from genmon.exceptions import ConfigurationError
from genmon.schemas.events import FinishReason, InferenceEvent, InferenceStatus

LANGUAGE_SCAN_CHARS = 200

_WORD = re.compile(r"[a-zà-ÿ']+")
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
    counts: dict[str, int] = {}
    latin = len(_ASCII_LETTERS.findall(head))
    if latin:
        counts["latin"] = latin
    if not head.isascii():
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
    for word in _WORD.findall(head.lower()):
        for lang in _LANGUAGES_OF_WORD.get(word, ()):
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
    """Computes :class:`ResponseSignals`; holds the compiled refusal phrase list."""

    def __init__(self, phrases: Mapping[str, list[str]], scan_chars: int = 300) -> None:
        if scan_chars < 1:
            raise ConfigurationError(f"scan_chars={scan_chars} must be >= 1")
        cleaned = sorted({_fold(p) for plist in phrases.values() for p in plist if p.strip()})
        self.languages = tuple(sorted(phrases))
        self.scan_chars = scan_chars
        self._refusal = re.compile(_prefix_tree_pattern(cleaned)) if cleaned else None

    @classmethod
    def from_file(cls, path: Path | None = None) -> QualitySignals:
        """Load a phrase file (default: the ``refusal_phrases.yaml`` shipped with genmon)."""
        if path is None:
            text = resources.files("genmon.streams").joinpath("refusal_phrases.yaml").read_text()
            where = "genmon.streams/refusal_phrases.yaml"
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read refusal phrase file {path}: {exc}; "
                    "fix GENMON_WINDOWS__REFUSAL_PHRASES_FILE"
                ) from exc
            where = str(path)
        data = yaml.safe_load(text) or {}
        phrases = data.get("phrases")
        if not isinstance(phrases, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in phrases.values()
        ):
            raise ConfigurationError(
                f"{where}: expected 'phrases:' mapping a language to a list of strings"
            )
        return cls(phrases, int(data.get("scan_chars", 300)))

    @classmethod
    def default(cls) -> QualitySignals:
        return cls.from_file(None)

    def is_refusal(self, response: str) -> bool:
        if self._refusal is None:
            return False
        return self._refusal.search(_fold(response[: self.scan_chars])) is not None

    def of(self, event: InferenceEvent) -> ResponseSignals:
        response = event.response
        empty = not response.strip()
        return ResponseSignals(
            empty=empty,
            truncated=event.status is InferenceStatus.TRUNCATED
            or event.finish_reason is FinishReason.LENGTH,
            refusal=not empty and self.is_refusal(response),
            response_chars=len(response),
            language="none" if empty else detect_language(response),
        )


def _prefix_tree_pattern(phrases: list[str]) -> str:
    """A regex matching where any of ``phrases`` starts, with shared prefixes merged.

    A flat ``a|b|c`` alternation tries every phrase at every position; the tree tries one
    branch per distinct next character (3x faster on a typical response). Only whether
    something matches is used, so a phrase that extends a shorter one is dropped.

    >>> print(_prefix_tree_pattern(["sorry", "sorry, but", "so sad", "i can't"]))
    (?:i\\ can't|so(?:\\ sad|rry))
    """
    tree: dict[str, dict] = {}
    for phrase in phrases:
        node = tree
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, dict]) -> str:
        if "" in node:
            return ""
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items())]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return pattern(tree)


def _fold(text: str) -> str:
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")
