"""The dataset builder: corrections become SFT pairs, merged by one rule, split by time with
near-duplicates kept on one side, redacted, hashed and stored so another machine reads the
same examples back."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.engine import Engine

from genmon.exceptions import ConfigurationError
from genmon.retrain.dataset import (
    MERGE_RULE,
    DatasetError,
    build_dataset,
    load_examples,
    read_dataset,
    write_dataset,
)
from genmon.schemas.redact import redact
from genmon.schemas.tables import LabelledExample

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TRIGGER = {"kind": "incident", "incident_id": "inc-1", "signal": "refusal_rate"}


def row(
    request_id: str,
    minute: int,
    prompt: str | None = None,
    correction: str | None = "the right answer",
    response: str = "I'm sorry, but I can't help with that.",
    *,
    label: str | None = "bad",
    segment: dict[str, str] | None = None,
    model_id: str = "m",
    id: int | None = None,
) -> LabelledExample:
    return LabelledExample(
        id=id,
        request_id=request_id,
        model_id=model_id,
        model_version="v1",
        prompt=prompt if prompt is not None else f"question {request_id}",
        response=response,
        correction=correction,
        label=label,
        segment=segment or {},
        created_at=T0 + timedelta(minutes=minute),
    )


def table_embed(vectors: dict[str, list[float]]) -> Callable[[list[str]], np.ndarray]:
    """An embedder that looks texts up; each other text gets a direction of its own."""

    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 64))
        for i, text in enumerate(texts):
            if text in vectors:
                out[i, : len(vectors[text])] = vectors[text]
            else:
                out[i, 10 + i] = 1.0
        return out

    return embed


def orthogonal(texts: list[str]) -> np.ndarray:
    return np.eye(len(texts))


def test_corrections_become_pairs_and_feedback_without_one_is_counted() -> None:
    rows = [
        row("a", 1, correction="Open the app and tap Cards."),
        row("b", 2, correction=None),  # a thumbs-down without a better answer
        row("c", 3, correction="   "),
        row("d", 4, correction=" same answer ", response="same answer"),
    ]
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0, embed=orthogonal)
    assert [(e.prompt, e.completion, e.rejected) for e in ds.train] == [
        ("question a", "Open the app and tap Cards.", "I'm sorry, but I can't help with that.")
    ]
    assert ds.eval == []
    sizes = ds.manifest["sizes"]
    assert (sizes["rows"], sizes["examples"]) == (4, 1)
    assert (sizes["without_correction"], sizes["unchanged"], sizes["merged"]) == (2, 1, 0)


def test_repeated_feedback_on_one_request_keeps_the_latest_nonempty_correction() -> None:
    rows = [
        row("r", 5, correction="  ", id=3),  # latest by time, but empty: it cannot win
        row("r", 1, correction="first try", id=1, label="wrong"),
        row("r", 3, correction="the final word", id=2, label="fixed", segment={"app": "x"}),
        row("r", 5, correction="", id=4),
        row("other", 2),
    ]
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0, embed=orthogonal)
    merged = [e for e in ds.train if e.request_id == "r"]
    assert len(merged) == 1
    assert merged[0].completion == "the final word"
    assert (merged[0].label, merged[0].segment) == ("fixed", {"app": "x"})
    assert merged[0].created_at == T0 + timedelta(minutes=3)
    sizes = ds.manifest["sizes"]
    assert sizes["merged"] == 3
    assert ds.manifest["merge_rule"] == MERGE_RULE
    assert sizes["rows"] == sizes["examples"] + sizes["merged"] + sizes["without_correction"]


def test_split_is_by_time_whatever_the_row_order() -> None:
    rows = [row(f"r{i:02d}", i) for i in range(20)]
    random.Random(3).shuffle(rows)
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0.2, embed=orthogonal)
    assert [e.request_id for e in ds.train] == [f"r{i:02d}" for i in range(16)]
    assert [e.request_id for e in ds.eval] == ["r16", "r17", "r18", "r19"]
    latest_train = max(e.created_at for e in ds.train if e.created_at)
    assert all(e.created_at and e.created_at > latest_train for e in ds.eval)
    assert ds.manifest["time_range"]["eval_first"] == (T0 + timedelta(minutes=16)).isoformat()


def test_near_duplicates_go_wholly_to_the_split_of_their_latest_member() -> None:
    vectors = {
        "old paraphrase": [1.0, 0.0],
        "middle paraphrase": [0.96, 0.28],  # cosine 0.96 with the old one
        "newest question": [0.85, 0.53],  # 0.96 with the middle one, 0.85 with the old one
        "close but not enough": [0.6, 0.8],  # 0.93 with the newest
    }
    rows = [
        row("old", 0, "old paraphrase"),
        row("close", 1, "close but not enough"),
        row("middle", 2, "middle paraphrase"),
        *[row(f"x{i}", 3 + i) for i in range(6)],
        row("new", 20, "newest question"),
    ]
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0.1, embed=table_embed(vectors))
    in_eval = {e.request_id for e in ds.eval}
    assert in_eval == {"new", "middle", "old"}  # linked by a chain, all follow the newest
    assert "close" in {e.request_id for e in ds.train}
    sizes = ds.manifest["sizes"]
    assert (sizes["moved_to_eval"], sizes["near_duplicate_groups"]) == (2, 1)
    train_prompts = {e.prompt for e in ds.train}
    assert not train_prompts & {e.prompt for e in ds.eval}


def test_prompts_equal_up_to_case_and_spaces_are_duplicates_without_an_embedder() -> None:
    rows = [row("a", 0, "How do I  reset my PIN?"), *[row(f"x{i}", i + 1) for i in range(3)]]
    rows.append(row("b", 9, "how do i reset my pin?"))
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0.2, near_duplicate_cosine=None)
    assert {e.request_id for e in ds.eval} == {"a", "b"}
    assert ds.manifest["split"]["embedder"] is None


def test_real_minilm_keeps_paraphrases_on_one_side() -> None:
    import torch

    torch.set_num_threads(1)
    rows = [
        row("early", 0, "How do I activate my card?"),
        row("variant", 1, "How do I activate my new card?"),  # cosine 0.94: not a duplicate
        row("rate", 2, "What is the exchange rate for euros?"),
        row("lost", 3, "I lost my phone, what should I do?"),
        row("pin", 4, "Where can I see my PIN?"),
        row("fee", 5, "Why was I charged a fee for withdrawing cash?"),
        row("late", 9, "how can I activate my card?"),  # cosine 0.99 with "early"
    ]
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0.1)
    assert {e.request_id for e in ds.eval} == {"early", "late"}
    assert "variant" in {e.request_id for e in ds.train}
    assert ds.manifest["split"]["embedder"] == "all-MiniLM-L6-v2"


def test_manifest_counts_and_hash_are_stable() -> None:
    rows = [
        row(f"r{i}", i, label="bad" if i % 3 else None, segment={"app": "bank", "tier": str(i % 2)})
        for i in range(10)
    ]
    first = build_dataset(rows, trigger=TRIGGER, eval_fraction=0.2, embed=orthogonal)
    again = build_dataset(
        list(reversed(rows)), trigger=TRIGGER, eval_fraction=0.2, embed=orthogonal
    )
    assert again.content_hash == first.content_hash
    assert again.manifest == first.manifest
    manifest = first.manifest
    assert manifest["content_hash"] == first.content_hash
    assert manifest["trigger"] == TRIGGER
    assert manifest["counts"]["all"] == {
        "label": {"(none)": 4, "bad": 6},
        "class": {"(none)": 4, "bad": 6},  # sft: the class is the label
        "segment": {"app=bank": 10, "tier=0": 5, "tier=1": 5},
    }
    assert (manifest["format"], manifest["strategy"]) == ("genmon-dataset/2", "sft")
    assert manifest["counts"]["eval"]["segment"] == {"app=bank": 2, "tier=0": 1, "tier=1": 1}
    assert manifest["time_range"]["first"] == T0.isoformat()
    assert manifest["time_range"]["last"] == (T0 + timedelta(minutes=9)).isoformat()
    assert (manifest["sizes"]["train"], manifest["sizes"]["eval"]) == (8, 2)

    rows[4].correction = "a different answer"
    assert build_dataset(rows, trigger=TRIGGER, embed=orthogonal).content_hash != first.content_hash
    other_trigger = build_dataset(rows, trigger={"kind": "manual"}, embed=orthogonal)
    changed = build_dataset(rows, trigger=TRIGGER, embed=orthogonal)
    assert other_trigger.content_hash == changed.content_hash  # the hash is of the content
    relabelled = [row(f"r{i}", i, label="other") for i in range(10)]
    plain = [row(f"r{i}", i, label="bad") for i in range(10)]
    assert (
        build_dataset(relabelled, trigger=TRIGGER, embed=orthogonal).content_hash
        != build_dataset(plain, trigger=TRIGGER, embed=orthogonal).content_hash
    )
    # The same corrections as SFT and as DPO examples are the same records: the strategy
    # is hashed too.
    sft = build_dataset(plain, trigger=TRIGGER, embed=orthogonal, strategy="sft")
    dpo = build_dataset(plain, trigger=TRIGGER, embed=orthogonal, strategy="dpo")
    assert (sft.train, sft.eval) == (dpo.train, dpo.eval)
    assert sft.content_hash != dpo.content_hash


def test_redaction_reaches_every_text_before_it_is_stored() -> None:
    rows = [
        row(
            "a",
            0,
            prompt="I am bob@example.com, card 4111 1111 1111 1111 is blocked",
            correction="We emailed bob@example.com about it.",
            response="Call +44 20 7946 0958 for help.",
        )
    ]
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0, embed=orthogonal, redact=redact)
    example = ds.train[0]
    assert example.prompt == "I am [REDACTED:email], card [REDACTED:card] is blocked"
    assert example.completion == "We emailed [REDACTED:email] about it."
    assert example.rejected == "Call [REDACTED:phone] for help."
    assert ds.manifest["redacted"] is True
    plain = build_dataset(rows, trigger=TRIGGER, eval_fraction=0, embed=orthogonal)
    assert "bob@example.com" in plain.train[0].prompt
    assert plain.manifest["redacted"] is False


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    from genmon.retrain.artifacts import ArtifactStore

    rows = [row(f"r{i}", i, segment={"app": "bank"}) for i in range(10)]
    ds = build_dataset(rows, trigger=TRIGGER, eval_fraction=0.3, embed=orthogonal)
    store = ArtifactStore(str(tmp_path / "artifacts"))
    uri = write_dataset(ds, store, "datasets/m/job-1")
    back = read_dataset(uri, store)
    assert back == ds
    manifest = json.loads(store.get_text(f"{uri}/manifest.json"))
    assert manifest["sizes"]["eval"] == 3

    assert back.manifest["strategy"] == "sft"

    store.put_text("datasets/m/job-1/eval.jsonl", "")  # altered after the fact
    with pytest.raises(DatasetError, match="does not match its manifest"):
        read_dataset(uri, store)
    store.put_text("datasets/m/half/train.jsonl", "")  # a writer that died before the manifest
    with pytest.raises(DatasetError, match=r"manifest\.json missing"):
        read_dataset(store.uri("datasets/m/half"), store)


def test_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="eval_fraction"):
        build_dataset([], trigger=TRIGGER, eval_fraction=1.0)
    with pytest.raises(ConfigurationError, match="near_duplicate_cosine"):
        build_dataset([], trigger=TRIGGER, near_duplicate_cosine=1.5)
    empty = build_dataset([], trigger=TRIGGER)
    assert (empty.train, empty.eval, empty.manifest["sizes"]["examples"]) == ([], [], 0)


def test_load_examples_reads_one_models_rows_since_a_time(engine: Engine) -> None:
    from genmon.db import session_scope

    with session_scope(engine) as session:
        for i in range(6):
            session.add(row(f"r{i}", 10 - i))
        session.add(row("elsewhere", 8, model_id="other"))
    with session_scope(engine) as session:
        everything = load_examples(session, "m", None)
        recent = load_examples(session, "m", T0 + timedelta(minutes=7))
    assert [r.request_id for r in everything] == ["r5", "r4", "r3", "r2", "r1", "r0"]
    assert [r.request_id for r in recent] == ["r3", "r2", "r1", "r0"]
    assert recent[0].created_at == T0 + timedelta(minutes=7)


def test_datasets_of_the_first_format_are_still_read_as_sft(tmp_path: Path) -> None:
    """What a genmon of issue #15 stored: ``genmon-sft/1``, examples without chat turns,
    KTO label or subject, hashed without a strategy."""
    import hashlib

    from genmon.retrain.artifacts import ArtifactStore

    line = (
        '{"completion":"the answer","created_at":"2025-03-01T12:00:00+00:00","label":"bad",'
        '"prompt":"question a","rejected":"I\'m sorry","request_id":"a","segment":{"app":"x"}}\n'
    )
    digest = hashlib.sha256()
    for name, data in (("train.jsonl", line.encode()), ("eval.jsonl", b"")):
        digest.update(f"{name}\n{len(data)}\n".encode() + data)
    old = {"format": "genmon-sft/1", "content_hash": digest.hexdigest(), "sizes": {}}
    store = ArtifactStore(str(tmp_path / "artifacts"))
    store.put_text("old/train.jsonl", line)
    store.put_text("old/eval.jsonl", "")
    store.put_text("old/manifest.json", json.dumps(old))
    back = read_dataset(store.uri("old"), store)
    [example] = back.train
    assert (example.prompt, example.completion, example.rejected) == (
        "question a",
        "the answer",
        "I'm sorry",
    )
    assert (example.created_at, example.subject_id, example.desirable) == (T0, None, None)
    assert (back.manifest["strategy"], back.content_hash) == ("sft", old["content_hash"])

    store.put_text("old/manifest.json", json.dumps({**old, "format": "genmon-sft/9"}))
    with pytest.raises(DatasetError, match="has format 'genmon-sft/9'"):
        read_dataset(store.uri("old"), store)
