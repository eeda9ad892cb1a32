"""One refusal definition: the aggregates' refusal count and RefusalRateDetector agree."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from genmon.detectors import InvalidParameterError, RefusalRateDetector
from genmon.detectors.quality import RefusalPhrases, is_refusal
from genmon.exceptions import ConfigurationError
from genmon.schemas.events import InferenceEvent
from genmon.settings import Settings
from genmon.streams.windows.aggregates import aggregate_inferences
from genmon.streams.windows.quality_signals import QualitySignals
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import DictStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)

# Where the two old definitions disagreed, and the rule's edges.
EDGE_CASES = [
    "I'm sorry, but I can't help with that.",
    "Sorry for the wait, here it is.",
    "No, I won't do that.",
    "I know, no, that is not how it works: here is the fix.",
    "**I cannot** assist with this request.",
    "I\u2019m sorry, I cannot provide instructions for that.",
    "As an AI, I don't have personal opinions, but here are the main arguments.",
    "As an AI language model, I can't browse the web.",
    "I apologize for the confusion earlier. The corrected code is below.",
    "I apologize, but I cannot share personal data.",
    "Lo siento, pero no puedo hacer eso.",
    "Désolé, mais je ne peux pas répondre.",
    "Here is a recipe. I cannot stress enough how important fresh basil is.",
    "The capital of France is Paris.",
    "x" * 400 + " I cannot provide that.",  # past the scanned opening
    "",
    "   ",
]
FILLERS = ["Sure.", "Here is the answer:", "Well,", "Note that", "Paris is big.", "no"]
LEADS = ["", " ", "\n", "**", '"', "> "]


def _texts(n: int, seed: int) -> list[str]:
    """Texts built around genmon's phrases, at the start, inside, and past the opening."""
    rng = np.random.default_rng(seed)
    phrases = [p.lstrip("^") for ps in RefusalPhrases.default().phrases.values() for p in ps]
    texts = []
    for _ in range(n):
        phrase = phrases[rng.integers(len(phrases))]
        before = " ".join(rng.choice(FILLERS, rng.integers(0, 3)))
        pad = "." * int(rng.choice([0, 0, 0, 280, 320]))
        texts.append(f"{rng.choice(LEADS)}{pad}{before} {phrase.capitalize()} the rest.")
    return texts


def _event(i: int, response: str) -> InferenceEvent:
    return InferenceEvent(
        request_id=f"r{i}",
        model_id="chat",
        model_version="v1",
        latency_ms=100.0,
        response=response,
        started_at=T0 + timedelta(milliseconds=i),
    )


def test_aggregates_refusal_count_equals_refusal_rate_detector_flags() -> None:
    texts = EDGE_CASES + _texts(400, seed=3)
    quality = QualitySignals.default()
    per_text = [quality.of(_event(i, t)).refusal for i, t in enumerate(texts)]
    assert per_text == [is_refusal(t) for t in texts]
    assert 0 < sum(per_text) < len(texts)  # both outcomes are exercised

    events = [(i, _event(i, t)) for i, t in enumerate(texts)]
    window = aggregate_inferences(events, 60_000, quality)
    (total,) = [stats for key, stats in window.items() if key.segment == "*"]
    detector = RefusalRateDetector(baseline_rate=0.1, window_size=len(texts), min_samples=1)
    result = detector.update(texts)
    assert total.summary()["refusal"] == result.evidence.value("flagged") == sum(per_text)
    assert total.summary()["refusal_rate"] == pytest.approx(result.score)


def test_definition_changes_are_the_intended_ones() -> None:
    # The detector's old English-only constants missed other languages and took the
    # disclaimer "As an AI, ..." and "Sorry for ..." for refusals; the aggregates' old
    # list missed refusals that only an opening gives away ("No, ...", "I cannot ...").
    assert is_refusal("Lo siento, pero no puedo hacer eso.")
    assert not is_refusal("As an AI, I don't have personal opinions, but here they are.")
    assert not is_refusal("Sorry for the wait, here it is.")
    assert QualitySignals.default().is_refusal("No, I won't do that.")
    assert QualitySignals.default().is_refusal("I cannot do that for you.")
    assert not is_refusal("I know, no, that is not it.")


def test_phrase_file_can_extend_or_replace_the_default(tmp_path) -> None:
    extend = tmp_path / "extend.yaml"
    extend.write_text("extend_default: true\nphrases:\n  sv: ['^tyvärr kan jag inte']\n")
    core = WindowState(Settings(windows={"refusal_phrases_file": extend}), DictStore())
    assert core.quality.is_refusal("Tyvärr kan jag inte hjälpa till med det.")
    assert core.quality.is_refusal("I cannot provide that.")
    assert not core.quality.is_refusal("Ja, men tyvärr kan jag inte komma.")  # not the opening
    assert set(core.quality.refusals.languages) >= {"en", "es", "sv"}

    replace = tmp_path / "replace.yaml"
    replace.write_text("scan_chars: 20\nphrases:\n  sv: ['tyvärr kan jag inte']\n")
    only = QualitySignals.from_file(replace)
    assert only.refusals.languages == ("sv",)
    assert not only.is_refusal("I cannot provide that.")
    assert not only.is_refusal("Ja, det går bra. Men tyvärr kan jag inte.")  # past 20 chars


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("phrases: [oops]\n", "expected 'phrases:'"),
        ("phrases:\n  en: [1, 2]\n", "expected 'phrases:'"),
        ("extend_default: yes please\nphrases: {}\n", "extend_default"),
        ("scan_chars: 0\nphrases: {}\n", "scan_chars"),
        ("extends_default: true\nphrases: {}\n", "unknown keys"),
        ("phrases: {en: ['a'\n", "not valid YAML"),
    ],
)
def test_bad_phrase_files_say_what_to_fix(tmp_path, document: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(document)
    with pytest.raises(ConfigurationError, match=message) as caught:
        QualitySignals.from_file(path)
    assert "GENMON_WINDOWS__REFUSAL_PHRASES_FILE" in str(caught.value)
    with pytest.raises(InvalidParameterError, match=message):
        RefusalPhrases.from_yaml(document, "p.yaml")
