"""Language change: the mix of writing scripts (or language labels) in a window vs a reference."""

from __future__ import annotations

import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    check_param,
    register,
)
from genmon.detectors.anomaly._common import changes_after
from genmon.detectors.exceptions import InputError

#: Unicode script names (first word of a letter's character name) that map to a language.
_SCRIPT_LANGUAGE = {"HANGUL": "korean", "HIRAGANA": "japanese", "KATAKANA": "japanese"}
#: Scanning the opening is enough to tell the script and bounds the cost per text.
MAX_SCRIPT_CHARS = 500
#: Labels beyond this many distinct ones share the label "other", to bound the state.
MAX_CATEGORIES = 64
#: Shares are floored here in the PSI so a category absent on one side stays finite.
PSI_EPSILON = 1e-4


@lru_cache(maxsize=8192)
def _char_script(char: str) -> str:
    name = unicodedata.name(char, "")
    first = name.split(" ", 1)[0]
    if first == "CJK":
        return "han"
    return _SCRIPT_LANGUAGE.get(first, first.lower() or "unknown")


def detect_script(text: str) -> str:
    """The dominant writing system of ``text``: ``latin``, ``cyrillic``, ``arabic``, ``han``...

    Letters only are counted. Kana anywhere means ``japanese`` (Japanese mixes kana with
    han), hangul means ``korean``; ``none`` when there are no letters. This is a script
    proxy, not a language identifier: English and French are both ``latin``.

    >>> detect_script("Where is my card?"), detect_script("Где моя карта?")
    ('latin', 'cyrillic')
    >>> detect_script("カードはどこですか"), detect_script("123 !!")
    ('japanese', 'none')
    """
    counts: Counter[str] = Counter(
        _char_script(c) for c in text[:MAX_SCRIPT_CHARS] if unicodedata.category(c).startswith("L")
    )
    if not counts:
        return "none"
    if counts["japanese"]:
        return "japanese"
    return counts.most_common(1)[0][0]


@register
class LanguageShiftDetector(Detector):
    """Alarms when the mix of scripts (or language labels) in a batch departs from a reference.

    Items are texts, mapped by :func:`detect_script`, or, with ``labels=True``, language
    labels from a language-ID model. The first ``reference_size`` items form the reference
    counts; the window is the last ``window_size`` items after them, across updates. Once
    it holds ``min_samples`` items it is tested with a chi-square test of homogeneity
    (window vs reference counts); it is *detected* when ``p <= alpha``
    and the Population Stability Index reaches ``min_psi`` (0.1 is the usual "moderate
    shift" line). ``score`` is the PSI and ``threshold`` is ``min_psi``.

    >>> d = LanguageShiftDetector(reference_size=100, window_size=60, min_samples=40)
    >>> d.update(["How do I pay my bill?"] * 95 + ["Comment payer ma facture ?"] * 5).detected
    False
    >>> r = d.update(["請問如何支付帳單？"] * 30 + ["How do I pay?"] * 30)
    >>> r.detected, r.evidence.value("share:han")
    (True, 0.5)

    References: K. Pearson, "On the criterion that a given system of deviations...",
    Philosophical Magazine 50 (1900); N. Siddiqi, *Credit Risk Scorecards*, Wiley (2006)
    for the PSI and its 0.1 / 0.25 rules of thumb; The Unicode Standard, Annex #24 (scripts).
    """

    name = "language_shift"
    kind = DetectorKind.QUALITY

    def __init__(
        self,
        reference_size: int = 500,
        window_size: int = 200,
        min_samples: int = 50,
        alpha: float = 0.01,
        min_psi: float = 0.1,
        labels: bool = False,
    ) -> None:
        check_param("reference_size", reference_size, low=1, high=10_000_000)
        check_param("window_size", window_size, low=1, high=1_000_000)
        check_param("min_samples", min_samples, low=1, high=window_size)
        check_param("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_param("min_psi", min_psi, low=0.0)
        self.reference_size = int(reference_size)
        self.window_size = int(window_size)
        self.min_samples = int(min_samples)
        self.alpha = float(alpha)
        self.min_psi = float(min_psi)
        self.labels = bool(labels)
        self.reset()

    def reset(self) -> None:
        self._n_seen = 0
        self._reference: dict[str, int] = {}
        self._window: list[str] = []

    def update(self, batch: Any) -> DetectorResult:
        categories = self._categories(batch)
        self._n_seen += len(categories)
        missing = self.reference_size - sum(self._reference.values())
        if missing > 0:
            for category in categories[:missing]:
                known = category in self._reference or len(self._reference) < MAX_CATEGORIES
                key = category if known else "other"
                self._reference[key] = self._reference.get(key, 0) + 1
            categories = categories[missing:]
        self._window = (self._window + categories)[-self.window_size :]
        if len(self._window) < self.min_samples:
            return self._result(
                score=0.0,
                threshold=self.min_psi,
                detected=False,
                n_seen=self._n_seen,
                evidence=Evidence(
                    test="chi2_contingency", notes=("building the reference or the window",)
                ),
            )
        return self._test(Counter(self._window))

    def _test(self, window: Counter[str]) -> DetectorResult:
        keys = sorted(set(self._reference) | set(window))
        table = np.array(
            [[self._reference.get(k, 0) for k in keys], [window.get(k, 0) for k in keys]]
        )
        p_value = 1.0
        if len(keys) > 1:
            p_value = float(stats.chi2_contingency(table, correction=False).pvalue)
        shares = table / table.sum(axis=1, keepdims=True)
        floored = np.maximum(shares, PSI_EPSILON)
        psi = float(np.sum((floored[1] - floored[0]) * np.log(floored[1] / floored[0])))
        moved = np.argsort(-np.abs(shares[1] - shares[0]))[:5]
        values = tuple(
            pair
            for i in moved
            for pair in (
                (f"share:{keys[i]}", float(shares[1, i])),
                (f"reference_share:{keys[i]}", float(shares[0, i])),
            )
        )
        return self._result(
            score=psi,
            threshold=self.min_psi,
            detected=bool(p_value <= self.alpha and psi >= self.min_psi),
            n_seen=self._n_seen,
            p_value=p_value,
            effect_size=psi,
            evidence=Evidence(test="chi2_contingency", values=(("psi", psi), *values)),
        )

    def _categories(self, batch: Any) -> list[str]:
        items = [batch] if isinstance(batch, str) else list(batch)
        if not items:
            raise InputError("LanguageShiftDetector.update() needs at least one item")
        if not all(isinstance(item, str) for item in items):
            raise InputError(
                "LanguageShiftDetector.update() takes texts (or labels with labels=True)"
            )
        return list(items) if self.labels else [detect_script(text) for text in items]

    def _get_state(self) -> dict[str, Any]:
        return {
            "n_seen": self._n_seen,
            "reference": dict(self._reference),
            "window": list(self._window),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._n_seen = int(state["n_seen"])
        self._reference = {str(k): int(v) for k, v in state["reference"].items()}
        self._window = [str(v) for v in state["window"]][-self.window_size :]

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        def stream(rng: np.random.Generator, n: int) -> list[str]:
            if constant is not None:
                return [f"label{constant}"] * n
            return ["en" if u < 0.9 else "fr" for u in rng.random(n)]

        def japanese(rng: np.random.Generator, n: int) -> list[str]:
            return ["ja" if u < 0.6 else "en" for u in rng.random(n)]

        detector = cls(reference_size=60, window_size=40, min_samples=20, labels=True)
        invalid = ({"min_psi": -0.1}, {"min_samples": 41}, {"alpha": 0.0})
        return ContractExample(detector, stream, changes_after(stream, japanese, 60), 60, invalid)
