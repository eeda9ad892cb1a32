"""The one definition of a refusal: a phrase list per language and the matcher for it.

genmon's list is ``refusal_phrases.yaml`` beside this module (package data, read once on
first use). The windowed aggregates (``genmon.streams.windows.quality_signals``) and
:class:`~genmon.detectors.quality.refusal.RefusalRateDetector` both match with it, so the
``refusal`` counts of a window and the detector's rate mean the same thing.

A response is a refusal when its first ``scan_chars`` characters, lower-cased, with
typographic apostrophes folded to ``'`` and leading spaces, quotes and ``*`` dropped,

- start with a phrase written with a leading ``^`` (``"^sorry, but"``): words that are a
  refusal only as the opening ("No, ..."), or
- contain any other phrase anywhere (``"i cannot provide"``).

Phrases of every language apply to every response: language-id on a two-line refusal is
unreliable, so lists are not gated by the detected language. The language keys are
free-form labels (ISO 639-1 by convention).

A phrase document (genmon's file, or the operator's ``GENMON_WINDOWS__REFUSAL_PHRASES_FILE``)
is a mapping::

    scan_chars: 300          # optional
    extend_default: true     # optional: add to genmon's list instead of replacing it
    phrases:
      sv: ["jag kan inte hjälpa", "^tyvärr kan jag inte"]

>>> phrases = RefusalPhrases({"en": ["^no,", "i cannot provide"]})
>>> phrases.is_refusal("No, I won't."), phrases.is_refusal("I know, no, not that.")
(True, False)
>>> phrases.is_refusal("Well... I cannot provide that.")
True
>>> RefusalPhrases.default().is_refusal("Lo siento, pero no puedo hacer eso.")
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

import yaml

from genmon.detectors.exceptions import InvalidParameterError

#: The mark that makes a phrase count only at the opening of a response.
OPENING_MARK = "^"
#: Refusals say so up front; scanning only the opening also bounds the cost per response.
DEFAULT_SCAN_CHARS = 300
DEFAULT_FILE = "refusal_phrases.yaml"
_PACKAGE = "genmon.detectors.quality"
_DOCUMENT_KEYS = frozenset({"scan_chars", "extend_default", "phrases"})

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# Markdown emphasis and quoting in front of "I cannot ..." must not hide the opening.
_LEADING = " \t\r\n\"'*"


def fold(text: str) -> str:
    """Lower-case ``text`` and fold typographic apostrophes, as phrases and responses are."""
    lowered = text.lower()
    # translate() walks every character; ASCII text has no typographic apostrophe to fold.
    return lowered if lowered.isascii() else lowered.translate(_QUOTES)


class RefusalPhrases:
    """A compiled refusal phrase list (see the module docstring for the rule).

    ``phrases`` maps a language label to its phrases; ``phrases`` and ``languages`` read
    back the cleaned list (folded, sorted, without duplicates or blanks).
    """

    def __init__(
        self, phrases: Mapping[str, Iterable[str]], scan_chars: int = DEFAULT_SCAN_CHARS
    ) -> None:
        if isinstance(scan_chars, bool) or not isinstance(scan_chars, int) or scan_chars < 1:
            raise InvalidParameterError(f"scan_chars={scan_chars!r} must be an integer >= 1")
        self.scan_chars = scan_chars
        if any(isinstance(plist, str) for plist in phrases.values()):
            raise InvalidParameterError("phrases must map a language to a list of strings")
        self.phrases: Mapping[str, tuple[str, ...]] = MappingProxyType(
            {
                str(lang): tuple(sorted({fold(p.strip()) for p in plist if p.strip(" ^")}))
                for lang, plist in sorted(phrases.items())
            }
        )
        self.languages = tuple(self.phrases)
        every = {p for plist in self.phrases.values() for p in plist}
        openings = sorted(p[1:].lstrip() for p in every if p.startswith(OPENING_MARK))
        anywhere = sorted(p for p in every if not p.startswith(OPENING_MARK))
        #: Phrases that count at the opening (without the mark), and anywhere.
        self.openings, self.anywhere = tuple(openings), tuple(anywhere)
        # Two patterns, not one with a "\A" branch: re.search would try that branch at
        # every position (1.4x slower per response).
        self._opening = re.compile(prefix_tree_pattern(openings)) if openings else None
        self._anywhere = re.compile(prefix_tree_pattern(anywhere)) if anywhere else None

    @classmethod
    def from_document(cls, data: Any, source: str) -> RefusalPhrases:
        """Build from a parsed phrase document; errors name ``source`` (a file, usually)."""
        if data is None:
            data = {}
        phrases = data.get("phrases") if isinstance(data, Mapping) else None
        if not isinstance(phrases, Mapping) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in phrases.values()
        ):
            raise InvalidParameterError(
                f"{source}: expected 'phrases:' mapping a language to a list of strings"
            )
        unknown = sorted(set(data) - _DOCUMENT_KEYS)
        if unknown:
            raise InvalidParameterError(
                f"{source}: unknown keys {unknown}; a phrase document has {sorted(_DOCUMENT_KEYS)}"
            )
        extend = data.get("extend_default", False)
        if not isinstance(extend, bool):
            raise InvalidParameterError(f"{source}: extend_default must be true or false")
        base = cls.default() if extend else None
        scan_chars = data.get("scan_chars", base.scan_chars if base else DEFAULT_SCAN_CHARS)
        try:
            return cls(base.merged_with(phrases) if base else phrases, scan_chars)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{source}: {exc}") from exc

    @classmethod
    def from_yaml(cls, text: str, source: str) -> RefusalPhrases:
        """Build from the YAML text of a phrase document."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidParameterError(f"{source}: not valid YAML: {exc}") from exc
        return cls.from_document(data, source)

    @staticmethod
    def default() -> RefusalPhrases:
        """genmon's list, ``refusal_phrases.yaml`` beside this module."""
        return _default()

    def merged_with(self, phrases: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
        """This list plus ``phrases``, per language (for building an extended list)."""
        merged = {lang: list(plist) for lang, plist in self.phrases.items()}
        for lang, plist in phrases.items():
            merged.setdefault(str(lang), []).extend(plist)
        return merged

    def is_refusal(self, response: str) -> bool:
        """True when ``response`` opens like a refusal under this list."""
        opening = fold(response[: self.scan_chars]).lstrip(_LEADING)
        if self._opening is not None and self._opening.match(opening) is not None:
            return True
        return self._anywhere is not None and self._anywhere.search(opening) is not None


@cache
def _default() -> RefusalPhrases:
    text = resources.files(_PACKAGE).joinpath(DEFAULT_FILE).read_text(encoding="utf-8")
    return RefusalPhrases.from_yaml(text, f"{_PACKAGE}/{DEFAULT_FILE}")


def prefix_tree_pattern(phrases: list[str]) -> str:
    """A regex matching where any of ``phrases`` starts, with shared prefixes merged.

    A flat ``a|b|c`` alternation tries every phrase at every position; the tree tries one
    branch per distinct next character (3x faster on a typical response). Only whether
    something matches is used, so a phrase that extends a shorter one is dropped.

    >>> print(prefix_tree_pattern(["sorry", "sorry, but", "so sad", "i can't"]))
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
