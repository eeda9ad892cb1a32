"""bench/replay/traffic.py: block-bootstrapped real traffic and its injected changes
(``changes.py``), read through ``traffic``'s re-exports as the replays use them.

These tests read the shared data sets (``../shared/datasets`` from the repository root),
the same files the replays use: the point is that the streams keep the traces' real
arrivals and token counts and the texts' real human labels, which fixtures cannot show.
Streams are 1 hour long to keep the file fast.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.replay import traffic
from bench.replay.traffic import Change, arrival_time, event_time, inject, is_inference
from genmon.schemas.events import FeedbackEvent, InferenceEvent

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"

START = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
AT = timedelta(minutes=30)
Events = list[dict[str, Any]]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (DATA_DIR / "azure_llm_inference_trace_2023").is_dir():
        pytest.fail(f"the replay tests need the shared data sets at {DATA_DIR}")
    return DATA_DIR


def _stream(data_dir: Path, trace: str = "azure_conv", seed: int = 1, **kw: Any) -> Events:
    return traffic.stationary(
        data_dir, trace, 1.0, seed=seed, model_id="support-bot", start=START, **kw
    )


@pytest.fixture(scope="module")
def conv(data_dir: Path) -> Events:
    return _stream(data_dir)


def _inferences(events: Events) -> Events:
    return [e for e in events if is_inference(e)]


def _feedback(events: Events) -> Events:
    return [e for e in events if not is_inference(e)]


def _offset_s(event: dict[str, Any]) -> float:
    return (event_time(event) - START).total_seconds()


# -- the stationary stream -------------------------------------------------------------------


def test_the_stream_is_deterministic_for_a_seed(data_dir: Path, conv: Events) -> None:
    assert _stream(data_dir) == conv
    assert _stream(data_dir, seed=2) != conv


def test_every_event_validates_and_the_stream_is_sorted(conv: Events) -> None:
    for event in conv:
        model = InferenceEvent if is_inference(event) else FeedbackEvent
        model(**event)
        json.dumps(event)
    # In arrival order, as a service's SDK produces them: inferences when they finished.
    times = [arrival_time(e) for e in conv]
    assert times == sorted(times)
    assert all(t.utcoffset() == timedelta(0) for t in times)
    ids = [e["request_id"] for e in _inferences(conv)]
    assert len(ids) == len(set(ids))
    first = _inferences(conv)[0]
    assert START <= event_time(first) < START + timedelta(minutes=5)


def _block(
    source: traffic.Trace, first: int, stop: int, shift: float
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One trace block: offsets within the block and (prompt, completion) token counts."""
    rows = slice(first, stop)
    pairs = zip(source.prompt_tokens[rows], source.completion_tokens[rows], strict=True)
    return source.offsets_s[rows] - shift, [(int(p), int(c)) for p, c in pairs]


@pytest.mark.parametrize("trace", traffic.TRACES)
def test_blocks_keep_the_traces_arrivals_and_token_counts(data_dir: Path, trace: str) -> None:
    block_s = traffic.MIN_BLOCK_S
    source = traffic.load_trace(data_dir, trace)
    n_blocks = int(source.span_s // block_s)
    edges = np.searchsorted(source.offsets_s, np.arange(n_blocks + 1) * block_s)
    blocks = [_block(source, edges[b], edges[b + 1], b * block_s) for b in range(n_blocks)]
    events = _inferences(_stream(data_dir, trace, error_rate=0.0))
    slots: dict[int, Events] = {}
    for e in events:
        slots.setdefault(int(_offset_s(e) // block_s), []).append(e)
    assert sorted(slots) == list(range(12))
    for slot, arrived in slots.items():
        # The trace's order: by start, ties in request order (ids count up).
        members = sorted(arrived, key=lambda e: (event_time(e), e["request_id"]))
        within = np.array([_offset_s(e) - slot * block_s for e in members])
        tokens = [(e["prompt_tokens"], e["completion_tokens"]) for e in members]
        assert any(
            len(offsets) == len(within)
            and pairs == tokens
            and np.allclose(offsets, within, atol=2e-6)
            for offsets, pairs in blocks
        ), f"slot {slot} of {trace} is not one of the trace's blocks"
    # the rate is the trace's: within 4 standard errors of the block bootstrap
    counts = np.diff(edges)
    rate = len(events) / 3600.0
    se = counts.std() / np.sqrt(len(slots)) / block_s
    assert abs(rate - counts.mean() / block_s) < 4 * se, (rate, counts.mean() / block_s)


def test_blocks_shorter_than_five_minutes_are_refused(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="block_s"):
        _stream(data_dir, block_s=60.0)


def _llmperf(data_dir: Path, provider: str) -> list[dict[str, Any]]:
    path = data_dir / "llmperf_leaderboard_latency" / "individual" / f"{provider}.json"
    return json.loads(path.read_text())


def test_latencies_follow_the_documented_model(data_dir: Path, conv: Events) -> None:
    records = _llmperf(data_dir, "fireworks_70b")
    errors = 0
    for e in _inferences(conv):
        name, _, position = e["metadata"]["latency_record"].partition(":")
        assert name == "fireworks_70b"
        rec = records[int(position)]
        assert rec["error_code"] is None
        started, finished = (datetime.fromisoformat(e[k]) for k in ("started_at", "finished_at"))
        assert (finished - started).total_seconds() * 1e3 == pytest.approx(
            e["latency_ms"], abs=1e-3
        )
        if e["status"] == "error":
            errors += 1
            assert (e["error_code"], e["response"], e["completion_tokens"]) == ("429", "", 0)
            assert e["time_to_first_token_ms"] is None
            assert e["latency_ms"] == pytest.approx(rec["ttft_s"] * 1e3)
            continue
        extra = max(e["prompt_tokens"] - rec["number_input_tokens"], 0)
        ttft = rec["ttft_s"] * 1e3 + 0.1 * extra
        tpot = rec["inter_token_latency_s"] * 1e3
        assert e["time_to_first_token_ms"] == pytest.approx(ttft, rel=1e-12)
        assert e["latency_ms"] == pytest.approx(ttft + tpot * (e["completion_tokens"] - 1))
    n = len(_inferences(conv))
    assert 0.003 * n - 4 * np.sqrt(0.003 * n) < errors < 0.003 * n + 4 * np.sqrt(0.003 * n)


def _human_thumbs(data_dir: Path) -> dict[str, str]:
    """text_source -> thumbs, read from the data sets directly."""
    thumbs = {}
    with (data_dir / "xstest" / "xstest_v2_completions_gpt4.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            label = row["final_label"].startswith("1_")
            thumbs[f"xstest_gpt4:{row['id']}"] = "up" if label else "down"
    rows = json.loads(
        (data_dir / "pandalm_human_annotated_testset" / "testset-v1.json").read_text()
    )
    for row in rows:
        (vote, count), *_ = Counter(str(row[f"annotator{i}"]) for i in (1, 2, 3)).most_common(1)
        if count >= 2 and vote in ("1", "2"):
            for which in (1, 2):
                thumbs[f"pandalm:{row['idx']}:{which}"] = "up" if vote == str(which) else "down"
    return thumbs


def test_feedback_comes_after_its_inference_with_the_human_label(
    data_dir: Path, conv: Events
) -> None:
    inferences = {e["request_id"]: e for e in _inferences(conv)}
    feedback = _feedback(conv)
    answered = sum(e["status"] == "ok" for e in inferences.values())
    assert 0.17 < len(feedback) / answered < 0.23
    thumbs = _human_thumbs(data_dir)
    for fb in feedback:
        inference = inferences[fb["request_id"]]
        assert inference["status"] == "ok"
        delay = datetime.fromisoformat(fb["created_at"]) - datetime.fromisoformat(
            inference["finished_at"]
        )
        assert timedelta(seconds=5) <= delay <= timedelta(seconds=120)
        assert fb["segment"] == inference["segment"]
        assert fb["model_id"] == inference["model_id"]
        assert fb["thumbs"] == thumbs[inference["metadata"]["text_source"]]


def test_texts_are_real_prompt_answer_pairs_with_app_and_locale(conv: Events) -> None:
    events = _inferences(conv)
    apps = Counter(e["segment"]["app"] for e in events)
    assert len(apps) == traffic.PANDALM_APPS + 1
    assert apps[traffic.XSTEST_APP] / len(events) == pytest.approx(traffic.XSTEST_SHARE, abs=0.02)
    assert {e["segment"]["locale"] for e in events} == {"en"}
    sources = Counter(e["metadata"]["text_source"].split(":")[0] for e in events)
    assert set(sources) == {"pandalm", "xstest_gpt4"}
    assert all(e["prompt"] and (e["response"] or e["status"] == "error") for e in events)


# -- injected changes ------------------------------------------------------------------------

SEGMENT = {"app": traffic.XSTEST_APP}
CHANGES = {
    "latency_regime": Change("latency_regime", AT, segment=SEGMENT),
    "error_burst": Change("error_burst", AT, segment=SEGMENT),
    "refusal_jump": Change("refusal_jump", AT, segment=SEGMENT),
    "language_switch": Change("language_switch", AT),
    "topic_switch": Change("topic_switch", AT),
    "negative_feedback": Change("negative_feedback", AT, segment={"app": "Gmail"}),
    "bad_deploy": Change("bad_deploy", AT),
}


@pytest.fixture(scope="module")
def injected(data_dir: Path, conv: Events) -> dict[str, tuple[Events, traffic.GroundTruth]]:
    return {
        kind: inject(conv, change, data_dir, seed=1, start=START)
        for kind, change in CHANGES.items()
    }


def _after(events: Events, segment: dict[str, str] | None = None, before: bool = False) -> Events:
    begin = START + AT
    return [
        e
        for e in events
        if (event_time(e) < begin) == before
        and all(e["segment"].get(k) == v for k, v in (segment or {}).items())
    ]


@pytest.mark.parametrize("kind", traffic.CHANGE_KINDS)
def test_a_change_starts_at_its_time_and_leaves_the_past_alone(
    kind: str, conv: Events, injected: dict[str, tuple[Events, traffic.GroundTruth]]
) -> None:
    changed, truth = injected[kind]
    assert _after(changed, before=True) == _after(conv, before=True)
    assert truth.kind == kind and truth.start == START + AT and truth.affected > 0
    assert truth.first_affected_at is not None and truth.first_affected_at >= truth.start
    assert truth.signals == traffic.SIGNALS[kind]
    json.dumps(truth.to_dict())
    inferences = {e["request_id"]: e for e in _inferences(changed)}
    for e in changed:
        (InferenceEvent if is_inference(e) else FeedbackEvent)(**e)
        if not is_inference(e):
            assert e["created_at"] > inferences[e["request_id"]]["finished_at"]
    assert [arrival_time(e) for e in changed] == sorted(arrival_time(e) for e in changed)


def test_a_change_with_a_duration_ends(data_dir: Path, conv: Events) -> None:
    change = Change("bad_deploy", AT, duration=timedelta(minutes=10))
    changed, truth = inject(conv, change, data_dir, seed=1, start=START)
    assert truth.end == START + AT + timedelta(minutes=10)
    versions = {e["model_version"] for e in _inferences(changed) if event_time(e) >= truth.end}
    assert versions == {"v1"}


def _by_id(events: Events) -> dict[str, dict[str, Any]]:
    return {e["request_id"]: e for e in _inferences(events)}


def test_latency_regime_takes_the_slow_providers_latencies_in_its_segment(
    injected: dict[str, tuple[Events, traffic.GroundTruth]], conv: Events
) -> None:
    changed, _ = injected["latency_regime"]
    hit = [e for e in _inferences(_after(changed, SEGMENT)) if e["status"] == "ok"]
    assert {e["metadata"]["latency_record"].split(":")[0] for e in hit} == {"replicate_70b"}
    base = _by_id(conv)
    ratio = np.median([e["latency_ms"] for e in hit]) / np.median(
        [base[e["request_id"]]["latency_ms"] for e in hit]
    )
    assert ratio > 2.0
    others = [e for e in _inferences(changed) if e["segment"]["app"] != traffic.XSTEST_APP]
    assert all(e == base[e["request_id"]] for e in others)


def test_latency_regime_by_a_factor_scales_ttft_and_tpot(data_dir: Path, conv: Events) -> None:
    change = Change("latency_regime", AT, factor=2.0)
    changed, _ = inject(conv, change, data_dir, seed=1, start=START)
    base = _by_id(conv)
    for e in _inferences(_after(changed)):
        if e["status"] == "ok":
            old = base[e["request_id"]]
            assert e["time_to_first_token_ms"] == pytest.approx(2 * old["time_to_first_token_ms"])
            assert e["latency_ms"] == pytest.approx(2 * old["latency_ms"])


def test_error_burst_fails_most_requests_of_its_segment(
    injected: dict[str, tuple[Events, traffic.GroundTruth]],
) -> None:
    changed, _ = injected["error_burst"]
    hit = _inferences(_after(changed, SEGMENT))
    failed = [e for e in hit if e["status"] == "error"]
    assert len(failed) / len(hit) == pytest.approx(0.87, abs=0.04)
    assert {(e["error_code"], e["response"], e["completion_tokens"]) for e in failed} == {
        ("429", "", 0)
    }
    rated = {fb["request_id"] for fb in _feedback(changed)}
    assert not rated & {e["request_id"] for e in failed}
    outside = _inferences(_after(changed, {"app": "Gmail"}))
    assert sum(e["status"] == "error" for e in outside) / len(outside) < 0.02


def test_refusal_jump_deploys_a_version_answering_with_llama2(
    data_dir: Path, injected: dict[str, tuple[Events, traffic.GroundTruth]]
) -> None:
    changed, truth = injected["refusal_jump"]
    assert truth.model_version == "v2"
    path = data_dir / "xstest" / "xstest_v2_completions_llama2orig.csv"
    with path.open(newline="") as handle:
        llama = {r["prompt"]: r for r in csv.DictReader(handle)}
    hit = [e for e in _inferences(_after(changed, SEGMENT)) if e["status"] == "ok"]
    assert {e["model_version"] for e in hit} == {"v2"}
    assert all(e["response"] == llama[e["prompt"]]["completion"].strip() for e in hit)
    refused = np.mean([not llama[e["prompt"]]["final_label"].startswith("1_") for e in hit])
    assert refused > 0.4  # GPT-4 refused 8 % of these prompts; Llama-2 refuses most
    thumbs = {e["request_id"]: llama[e["prompt"]]["final_label"] for e in hit}
    for fb in _feedback(changed):
        if fb["request_id"] in thumbs:
            assert (fb["thumbs"] == "up") == thumbs[fb["request_id"]].startswith("1_")
    assert {e["model_version"] for e in _inferences(_after(changed, before=True))} == {"v1"}


def test_language_switch_turns_prompts_japanese(
    injected: dict[str, tuple[Events, traffic.GroundTruth]],
) -> None:
    changed, _ = injected["language_switch"]

    def japanese(text: str) -> bool:
        return any("\u3040" <= ch <= "\u30ff" for ch in text)

    after = _inferences(_after(changed))
    assert np.mean([japanese(e["prompt"]) for e in after]) > 0.8
    assert not any(japanese(e["prompt"]) for e in _inferences(_after(changed, before=True)))


def test_topic_switch_turns_prompts_to_one_clinc150_domain(
    data_dir: Path, injected: dict[str, tuple[Events, traffic.GroundTruth]]
) -> None:
    changed, _ = injected["topic_switch"]
    domains = json.loads((data_dir / "clinc150" / "domains.json").read_text())
    data = json.loads((data_dir / "clinc150" / "data_full.json").read_text())
    travel = {
        text for split in data.values() for text, intent in split if intent in domains["travel"]
    }
    assert all(e["prompt"] in travel for e in _inferences(_after(changed)))


def test_negative_feedback_turns_one_apps_thumbs_down(
    injected: dict[str, tuple[Events, traffic.GroundTruth]], conv: Events
) -> None:
    changed, _ = injected["negative_feedback"]
    gmail = {"app": "Gmail"}

    def down(events: Events) -> float:
        return float(np.mean([fb["thumbs"] == "down" for fb in _feedback(events)]))

    assert down(_after(changed, gmail)) == pytest.approx(0.7, abs=0.1)
    assert down(_after(changed, {"app": "Spotify"})) == down(_after(conv, {"app": "Spotify"}))


def test_bad_deploy_triples_the_new_versions_ttft(
    injected: dict[str, tuple[Events, traffic.GroundTruth]], conv: Events
) -> None:
    changed, truth = injected["bad_deploy"]
    assert truth.model_version == "v2"
    base = _by_id(conv)
    base_feedback = {fb["request_id"]: fb for fb in _feedback(conv)}
    for e in _inferences(_after(changed)):
        assert e["model_version"] == "v2"
        if e["status"] != "ok":
            continue
        old = base[e["request_id"]]
        assert e["time_to_first_token_ms"] == pytest.approx(3 * old["time_to_first_token_ms"])
        assert e["latency_ms"] == pytest.approx(
            old["latency_ms"] + 2 * old["time_to_first_token_ms"]
        )
    now = _by_id(changed)
    for fb in _feedback(_after(changed)):
        old_fb, request_id = base_feedback[fb["request_id"]], fb["request_id"]
        shift = datetime.fromisoformat(now[request_id]["finished_at"]) - datetime.fromisoformat(
            base[request_id]["finished_at"]
        )
        expected = datetime.fromisoformat(old_fb["created_at"]) + shift
        assert datetime.fromisoformat(fb["created_at"]) == expected


# -- merging, writing, the command line ------------------------------------------------------


def test_merge_writes_two_models_in_time_order(data_dir: Path, tmp_path: Path) -> None:
    one = traffic.stationary(
        data_dir, "azure_code", 0.1, seed=1, model_id="support-bot", start=START
    )
    other = traffic.stationary(data_dir, "mooncake", 0.1, seed=1, model_id="code-bot", start=START)
    merged = traffic.merge(one, other)
    assert len(merged) == len(one) + len(other)
    assert [arrival_time(e) for e in merged] == sorted(arrival_time(e) for e in merged)
    assert {e["model_id"] for e in merged} == {"support-bot", "code-bot"}
    path = tmp_path / "two.jsonl"
    assert traffic.write_jsonl(merged, path) == len(merged)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == merged
    with pytest.raises(ValueError, match="twice"):
        traffic.merge(one, one)


def test_the_command_line_writes_a_changed_stream(data_dir: Path, tmp_path: Path) -> None:
    out, home = tmp_path / "x.jsonl", tmp_path / "data"
    env = {**os.environ, "GENMON_DATA_DIR": str(data_dir)}
    args = ["--trace", "azure_code", "--hours", "0.2", "--seed", "3", "--model", "support-bot"]
    args += ["--out", str(out), "--change", "error_burst", "--at-min", "6", "--segment", "app=IMDB"]
    run = subprocess.run(
        [sys.executable, "-W", "error", "-m", "bench.replay.traffic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inference" in run.stdout and "feedback events" in run.stdout
    assert '"kind": "error_burst"' in run.stdout
    events = [json.loads(line) for line in out.read_text().splitlines()]
    counted = run.stdout.split(": ")[-1]
    assert f"{sum(map(is_inference, events))} inference" in counted
    shown = subprocess.run(
        [sys.executable, "-c", "from bench.replay.traffic import DEFAULT_DATA_DIR as d; print(d)"],
        cwd=ROOT,
        env={**os.environ, "GENMON_DATA_DIR": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == str(home)
    if "GENMON_DATA_DIR" not in os.environ:
        assert ROOT.parent / "shared" / "datasets" == traffic.DEFAULT_DATA_DIR
