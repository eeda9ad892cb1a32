"""All the feedback users send as training data: KTO examples from thumbs and scores, DPO
pairs from corrections, the strategy the data supports and why, opted-out subjects left out,
at most N examples per subject and class, a bias incident's segment up-weighted in training
only, and the trigger guard and the job counting what the strategy can use."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import retrain_support_triggers as support
from sqlalchemy.engine import Engine
from sqlmodel import Session

from genmon.exceptions import ConfigurationError
from genmon.retrain.consent import load_opted_out
from genmon.retrain.dataset import build_dataset, load_examples, read_dataset
from genmon.retrain.preference_data import Available, choose_strategy
from genmon.schemas.events import RetrainStatus
from genmon.schemas.governance import SubjectOptOut
from genmon.schemas.redact import redact
from genmon.schemas.tables import LabelledExample, RetrainJob

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TRIGGER = {"kind": "manual"}
SORRY = "I'm sorry, but I can't help with that."


def row(
    request_id: str,
    minute: int,
    *,
    correction: str | None = None,
    score: float | None = None,
    response: str = SORRY,
    subject: str | None = None,
    label: str | None = None,
    segment: dict[str, str] | None = None,
    messages: list[dict[str, str]] | None = None,
    model_id: str = "m",
) -> LabelledExample:
    return LabelledExample(
        request_id=request_id,
        model_id=model_id,
        model_version="v1",
        prompt=f"question {request_id}",
        response=response,
        correction=correction,
        score=score,
        label=label,
        segment=segment or {},
        subject_id=subject,
        messages=messages,
        created_at=T0 + timedelta(minutes=minute),
    )


def orthogonal(texts: list[str]) -> np.ndarray:
    return np.eye(len(texts))


def build(rows: list[LabelledExample], **options: Any) -> Any:
    options = {"trigger": TRIGGER, "eval_fraction": 0, "embed": orthogonal, **options}
    return build_dataset(rows, **options)


# -- examples per strategy ------------------------------------------------------------------
def test_thumbs_and_scores_become_unpaired_kto_examples() -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rows = [
        row("up", 0, score=1.0, response="Tap Cards.", subject="s1", messages=chat),
        row("down", 1, score=0.0, segment={"locale": "de"}),
        row("fine", 2, score=0.6, response="Sure."),
        row("meh", 3, score=0.4),  # between the cuts below: neutral
        row("fixed", 4, correction="Open the app.", score=0.0, label="cards"),
        row("silent", 5),  # neither a correction nor a score
    ]
    ds = build(rows, strategy="kto", negative_score_below=0.3)
    got = [(e.request_id, e.completion, e.desirable) for e in ds.train]
    assert got == [
        ("up", "Tap Cards.", True),
        ("down", SORRY, False),
        ("fine", "Sure.", True),
        ("fixed", SORRY, False),  # a correction gives both sides
        ("fixed", "Open the app.", True),
    ]
    up = ds.train[0]
    assert (up.messages, up.subject_id, up.rejected) == (chat, "s1", None)
    assert (ds.train[1].segment, ds.train[4].label) == ({"locale": "de"}, "cards")
    manifest = ds.manifest
    assert manifest["strategy"] == "kto"
    assert manifest["counts"]["all"]["class"] == {"desirable": 3, "undesirable": 2}
    assert manifest["kto"]["desirable_at_or_above"] == 0.5
    assert manifest["kto"]["undesirable_below"] == 0.3
    assert "undesirable (prompt, logged response)" in manifest["kto"]["from_corrections"]
    sizes = manifest["sizes"]
    assert (sizes["neutral"], sizes["without_feedback"], sizes["without_correction"]) == (1, 1, 5)


def test_the_negative_cut_moves_the_desirable_cut_above_it() -> None:
    rows = [row("a", 0, score=0.5), row("b", 1, score=0.7), row("c", 2, score=0.8)]
    ds = build(rows, strategy="kto", negative_score_below=0.75)
    assert [(e.request_id, e.desirable) for e in ds.train] == [
        ("a", False),
        ("b", False),
        ("c", True),
    ]
    assert ds.manifest["kto"]["desirable_at_or_above"] == 0.75


def test_dpo_pairs_need_a_logged_response_that_differs() -> None:
    rows = [
        row("a", 0, correction="Open the app."),
        row("b", 1, correction="Call us.", response="  "),  # nothing was served to reject
        row("c", 2, correction="same", response=" same "),  # teaches nothing
        row("d", 3, score=0.0),  # thumbs: no pair
    ]
    dpo = build(rows, strategy="dpo")
    assert [(e.completion, e.rejected) for e in dpo.train] == [("Open the app.", SORRY)]
    assert (dpo.manifest["sizes"]["without_rejected"], dpo.manifest["sizes"]["unchanged"]) == (1, 1)
    sft = build(rows, strategy="sft")
    assert [(e.completion, e.rejected) for e in sft.train] == [
        ("Open the app.", SORRY),
        ("Call us.", None),
    ]


def test_redaction_reaches_the_chat_turns() -> None:
    chat = [{"role": "user", "content": "I am bob@example.com"}]
    rows = [row("a", 0, correction="Mail bob@example.com", messages=chat)]
    [example] = build(rows, redact=redact).train
    assert example.messages == [{"role": "user", "content": "I am [REDACTED:email]"}]
    assert example.completion == "Mail [REDACTED:email]"


# -- which strategy -------------------------------------------------------------------------
def available(**counts: Any) -> Available:
    return Available(**{"rows": 10, **counts})


def test_auto_picks_kto_with_thumbs_else_sft_on_corrections_else_nothing() -> None:
    thumbs = available(desirable=4, undesirable=3, good=2, bad=1, corrections={"(none)": 2})
    choice = choose_strategy("auto", thumbs, min_per_class=3)
    assert choice.strategy == "kto"
    assert choice.reason.startswith("auto: kto, 3 thumbs or scores without a correction and 2")

    few = available(desirable=4, undesirable=2, good=2, corrections={"a": 3, "b": 3})
    choice = choose_strategy("auto", few, min_per_class=3)
    assert choice.strategy == "sft"
    assert choice.reason == (
        "auto: sft, 6 corrections by label: a 3, b 3 (3 per class); too few thumbs or scores"
        " for kto (desirable 4, undesirable 2; 3 per class)"
    )
    # Corrections alone give KTO both classes, but auto keeps SFT for them.
    only = available(desirable=5, undesirable=5, corrections={"(none)": 5})
    assert choose_strategy("auto", only).strategy == "sft"

    none = choose_strategy("auto", available(desirable=3, good=3), min_per_class=1)
    assert none.strategy is None
    assert none.reason.startswith(
        "no usable feedback: 10 rows: 0 corrections, 3 thumbs up or good scores, 0 down or bad;"
    )


def test_an_explicit_strategy_is_honoured_or_refused_with_the_reason() -> None:
    corrections = available(corrections={"x": 2}, pairs={"x": 1}, desirable=2, undesirable=1)
    assert choose_strategy("dpo", corrections).strategy == "dpo"
    refused = choose_strategy("dpo", corrections, min_per_class=2)
    assert refused.strategy is None
    assert refused.reason.startswith(
        "training.strategy is dpo, which needs correction pairs (a correction and a different"
        " logged response, 2 of each label): have x 1 (10 rows: 2 corrections,"
    )
    assert choose_strategy("sft", corrections, min_per_class=2).strategy == "sft"
    kto = choose_strategy("kto", corrections, min_per_class=2)
    assert (kto.strategy, kto.reason.split(" (")[0]) == (
        None,
        "training.strategy is kto, which needs desirable and undesirable examples",
    )
    thumbs_only = build([row("a", 0, score=1.0), row("b", 1, score=0.0)], strategy="sft")
    assert (thumbs_only.train, thumbs_only.eval, thumbs_only.manifest["strategy"]) == ([], [], None)
    assert thumbs_only.manifest["strategy_reason"].startswith("training.strategy is sft")
    assert thumbs_only.manifest["requested_strategy"] == "sft"


# -- consent --------------------------------------------------------------------------------
def test_opted_out_subjects_never_reach_a_dataset(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(SubjectOptOut(subject_id="gone", requested_by="dpo-officer"))
        session.add(row("a", 0, correction="A.", subject="gone"))
        session.add(row("b", 1, score=0.0, subject="gone"))
        session.add(row("c", 2, correction="C.", subject="kept"))
        session.add(row("d", 3, score=1.0))
        session.commit()
    with Session(engine) as session:
        opted_out = load_opted_out(session)
        rows = load_examples(session, "m")
    assert opted_out == frozenset({"gone"})
    ds = build(rows, opted_out=opted_out, strategy="kto")
    assert {e.subject_id for e in ds.train} == {"kept", None}
    assert {e.request_id for e in ds.train} == {"c", "d"}
    assert ds.manifest["sizes"]["opted_out"] == 2


def test_each_subject_gives_at_most_n_per_class_the_latest() -> None:
    rows = [
        *[row(f"bad{i}", i, correction=f"fix {i}", subject="loud", label="bad") for i in range(5)],
        *[row(f"ok{i}", 10 + i, correction="fine", subject="loud", label="ok") for i in range(3)],
        *[row(f"anon{i}", 20 + i, correction="anon") for i in range(4)],  # no subject: uncapped
        row("other", 30, correction="other", subject="quiet", label="bad"),
    ]
    shuffled = list(rows)
    random.Random(5).shuffle(shuffled)
    ds = build(shuffled, max_per_subject=2, strategy="sft")
    assert build(rows, max_per_subject=2, strategy="sft").content_hash == ds.content_hash
    loud = [(e.request_id, e.label) for e in ds.train if e.subject_id == "loud"]
    assert loud == [("bad3", "bad"), ("bad4", "bad"), ("ok1", "ok"), ("ok2", "ok")]
    assert sum(1 for e in ds.train if e.subject_id is None) == 4
    assert (ds.manifest["sizes"]["capped"], ds.manifest["max_per_subject"]) == (4, 2)

    # KTO's classes are desirable and undesirable: a correction counts in both.
    thumbs = [row(f"t{i}", 40 + i, score=0.0, subject="loud") for i in range(3)]
    kto = build(rows + thumbs, max_per_subject=2, strategy="kto")
    mine = [(e.request_id, e.desirable) for e in kto.train if e.subject_id == "loud"]
    assert mine == [("ok1", True), ("ok2", True), ("t1", False), ("t2", False)]
    with pytest.raises(ConfigurationError, match="max_per_subject"):
        build(rows, max_per_subject=0)


# -- up-weighting ---------------------------------------------------------------------------
def test_a_segment_is_up_weighted_in_training_only() -> None:
    rows = [
        row(f"r{i}", i, correction=f"answer {i}", segment={"locale": "de" if i % 2 else "en"})
        for i in range(10)
    ]
    plain = build(rows, eval_fraction=0.2)
    ds = build(rows, eval_fraction=0.2, upweight={"locale": "de"}, upweight_factor=2.0)
    german = [e.request_id for e in ds.train if e.segment["locale"] == "de"]
    assert german == ["r1", "r1", "r3", "r3", "r5", "r5", "r7", "r7"]
    assert ds.eval == plain.eval  # never up-weighted
    assert ds.manifest["upweight"] == {
        "segment": {"locale": "de"},
        "factor": 2.0,
        "method": "repeat",
        "examples": 4,
        "added": 4,
    }
    assert ds.manifest["sizes"]["train"] == 12
    assert ds.content_hash != plain.content_hash
    assert plain.manifest["upweight"] is None

    half = build(rows, eval_fraction=0.2, upweight={"locale": "de"}, upweight_factor=1.5)
    assert [e.request_id for e in half.train if e.segment["locale"] == "de"] == [
        "r1",
        "r3",
        "r3",
        "r5",
        "r7",
        "r7",
    ]
    with pytest.raises(ConfigurationError, match="upweight_factor"):
        build(rows, upweight={"locale": "de"}, upweight_factor=0.5)


# -- the guard and the job ------------------------------------------------------------------
def thumbs(engine: Engine, model_id: str, up: int, down: int) -> None:
    with Session(engine) as session:
        for i in range(up + down):
            session.add(row(f"{model_id}-{i}", i, score=1.0 if i < up else 0.0, model_id=model_id))
        session.commit()


def test_a_model_with_thumbs_only_passes_the_guard_for_kto(engine: Engine) -> None:
    from genmon.retrain.triggers import manual_request, store_request

    support.register(engine, "bot")
    thumbs(engine, "bot", up=3, down=2)
    with Session(engine) as session:  # an opted-out subject's thumbs count for nothing
        session.add(SubjectOptOut(subject_id="gone"))
        session.add(row("gone", 9, score=0.0, subject="gone", model_id="bot"))
        session.commit()
    auto = support.policy(min_examples_per_class=3)
    refused = store_request(engine, auto, manual_request("bot", "v1", "thumbs"))
    assert refused.reason.startswith(
        "too few examples: usable examples (with a correction) by class: none;"
        " guards.min_examples_per_class is 3 (test-policy.yaml); thumbs and scores without a"
        " correction: 5 (kto: desirable 3, undesirable 2)"
    )
    thumbs(engine, "bot2", up=3, down=3)
    support.register(engine, "bot2")
    queued = store_request(engine, auto, manual_request("bot2", "v1", "thumbs"))
    assert queued.job_id is not None
    [job] = support.jobs(engine, "bot2")
    assert job.params["strategy"] == "auto"


def test_the_job_builds_for_its_strategy_and_explains_an_empty_dataset(
    engine: Engine, tmp_path: Path
) -> None:
    from genmon.retrain.artifacts import ArtifactStore
    from genmon.retrain.job import JobRun
    from genmon.retrain.queue import JobQueue, get_job
    from genmon.settings import Settings

    thumbs(engine, "m", up=6, down=4)
    with Session(engine) as session:
        session.add(SubjectOptOut(subject_id="gone"))
        session.add(row("x", 50, score=0.0, subject="gone", segment={"locale": "de"}))
        session.add(row("y", 51, score=1.0, segment={"locale": "de"}))
        for strategy, name in (("auto", "bias"), ("sft", "strict")):
            params = {"trainer": "lora", "training": {}, "gate": {}, "rollout": {}}
            session.add(
                RetrainJob(
                    job_id=name,
                    model_id="m",
                    base_version="v1",
                    params={**params, "strategy": strategy, "min_examples": 1},
                    context={"kind": "bias", "signal": "refusal_rate", "segment": "locale=de"},
                    created_at=T0 + timedelta(seconds=len(name)),
                )
            )
        session.commit()
    store = ArtifactStore(str(tmp_path / "artifacts"))
    queue = JobQueue(engine, "w1", 300.0)
    for expected in ("bias", "strict"):
        lease = queue.claim()
        assert lease is not None and lease.job_id == expected
        run = JobRun(Settings(), engine, queue, lease, store, tmp_path)
        built = run.dataset(get_job(engine, lease.job_id))
        job = get_job(engine, lease.job_id)
        assert job.dataset_hash == built.content_hash
        assert read_dataset(job.dataset_uri or "", store) == built
        if expected == "bias":
            assert built.manifest["strategy"] == "kto"
            assert built.manifest["sizes"]["opted_out"] == 1
            assert built.manifest["upweight"]["segment"] == {"locale": "de"}
            assert job.metrics["dataset"]["strategy"] == "kto"
            queue.finish(lease, RetrainStatus.REJECTED)
            continue
        assert built.manifest["strategy"] is None
        assert run.reject_empty(built) is RetrainStatus.REJECTED
        [reason] = get_job(engine, "strict").verdict["reasons"]
        assert reason.startswith(
            "insufficient evidence: training.strategy is sft, which needs corrections (1 of"
            " each label): have none (12 rows: 0 corrections, 7 thumbs up or good scores, 4"
            " down or bad)"
        )
        assert reason.endswith("send corrections or thumbs first")
