"""The native ingest path against the Python one: same acceptance, same signals, same state."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genmon.exceptions import SchemaError
from genmon.schemas import codec
from genmon.schemas.events import MAX_EVENT_BYTES, FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams import native
from genmon.streams.app import create_app
from genmon.streams.ingest import Ingestor
from genmon.streams.pipeline import install_pipeline
from genmon.streams.windows.join import JoinTable, record_entries
from genmon.streams.windows.quality_signals import QualitySignals
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import SEP, DictStore

QUALITY = QualitySignals.default()
DECODER = native.decoder_for(QUALITY)
BASE = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)

TEXTS = [
    "",
    " \t\n",
    "\x1c\u3000",
    "I'm sorry, but I can't help with that.",
    "**I cannot** do this",
    "\u2019I\u2019m sorry",
    "No, never.",
    "I know, no, not that.",
    "It is not appropriate to ask. Still, here you go.",
    "The cat is on the table and it is happy.",
    "Le chat est sur la table et il est content.",
    "Der Hund ist nicht hier, und die Katze auch nicht.",
    "El perro está en la casa con los niños.",
    "O gato está em casa, não é?",
    "Il gatto è sul tavolo e non dorme.",
    "こんにちは、元気ですか",
    "你好，世界",
    "안녕하세요",
    "Привет, мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε ΣΑΣ",
    "שלום עולם",
    "สวัสดีชาวโลก",
    "Bonjour ÷ é à",
    "it's it's it's le chat",
    "d'il est l'été÷the",
    "İstanbul ÇAĞ",
    "12345 !!!",
    "Lo siento, pero no puedo hacer eso.",
    "x" * 400,
    "word " * 100 + "I cannot provide",
]


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    assert native.available(), (
        "genmon_native is not built: reinstall with a Rust toolchain "
        "(infra/bootstrap.sh) so the native ingest path is tested"
    )


def python_signals(text: str) -> tuple[bool, bool, int, str]:
    event = InferenceEvent(model_id="m", latency_ms=1, response=text)
    s = QUALITY.of(event)
    return s.empty, s.refusal, s.response_chars, s.language


@pytest.mark.parametrize("text", TEXTS)
def test_signals_match_the_python_definition(text: str) -> None:
    assert DECODER is not None
    assert DECODER.signals(text) == python_signals(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(TEXTS),
            st.text(max_size=60),
            st.text(alphabet="aeiouéèàüñßΣσς'’ \t*\"nosrycatI,.", max_size=60),
        ),
        max_size=4,
    ).map("".join)
)
def test_signals_match_the_python_definition_on_any_text(text: str) -> None:
    assert DECODER is not None
    assert DECODER.signals(text) == python_signals(text)


#: Text PostgreSQL cannot store (json.dumps writes ``\\u0000`` and ``\\ud800`` escapes),
#: and a surrogate pair, which is fine.
UNSTORABLE = ["a\x00b", "\x00", "\ud800", "x\udc00", "\udc00\ud800", "\ud83d\ude00"]


def _fields() -> st.SearchStrategy[dict[str, Any]]:
    """Event objects mixing valid values with every kind of value the fast path defers."""
    junk = st.one_of(
        st.sampled_from(UNSTORABLE),
        st.none(),
        st.booleans(),
        st.integers(-5, 10**8),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
        st.just("5.0"),
        st.just([]),
        st.just({}),
    )
    times = st.sampled_from(
        [
            "2026-11-29T10:00:00Z",
            "2026-11-29T10:00:00.123+02:00",
            "2026-11-29T10:00:00.1234567Z",
            "2026-11-29T10:00:00",
            "2026-11-29 10:00:00Z",
            "2026-02-30T10:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-11-29T10:00:00z",
            "2026-11-29T10:00:00+0200",
            "2026-11-29T09:00:00-05:30",
        ]
    )
    turn = st.fixed_dictionaries(
        {
            "role": st.one_of(
                st.sampled_from(["system", "user", "assistant", "tool", "bot"]), junk
            ),
            "content": st.one_of(st.sampled_from(TEXTS), st.just("c" * 32_769), junk),
        },
        optional={"name": junk},
    )
    turns = st.one_of(
        st.lists(st.one_of(turn, junk), max_size=3),
        st.just([{"role": "user", "content": "x"}] * 257),
    )
    return st.fixed_dictionaries(
        {"model_id": st.one_of(st.just("chat"), junk)},
        optional={
            "request_id": st.one_of(st.just("r1"), st.just(""), junk),
            "latency_ms": st.one_of(st.floats(0, 9e7), junk),
            "started_at": st.one_of(times, junk),
            "finished_at": st.one_of(times, junk),
            "model_version": st.one_of(st.just("v1"), junk),
            "prompt": st.one_of(st.sampled_from(TEXTS), junk),
            "response": st.one_of(st.sampled_from(TEXTS), junk),
            "messages": st.one_of(turns, junk),
            "time_to_first_token_ms": st.one_of(st.floats(0, 9e7), junk),
            "prompt_tokens": st.one_of(st.integers(-1, 2 * 10**7), junk),
            "status": st.one_of(st.sampled_from(["ok", "error", "truncated", "nope"]), junk),
            "error_code": st.one_of(st.just("E" * 129), st.just("E1"), junk),
            "finish_reason": st.one_of(st.sampled_from(["stop", "length", "x"]), junk),
            "segment": st.one_of(
                st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), junk)), junk
            ),
            "subject_id": st.one_of(st.just("s"), junk),
            "metadata": st.one_of(st.dictionaries(st.text(max_size=3), junk), junk),
            "schema_version": st.one_of(st.just(1), junk),
            "extra": junk,
        },
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fields())
def test_the_fast_path_accepts_only_what_pydantic_accepts(fields: dict[str, Any]) -> None:
    raw = json.dumps(fields).encode()
    assert DECODER is not None
    batch = DECODER.decode([raw], [0], [0], MAX_EVENT_BYTES)
    sanitized: list[str] = []
    try:
        event = codec.decode(raw, InferenceEvent, sanitized=sanitized)
    except SchemaError:
        assert batch.deferred == [0], f"accepted what pydantic rejects: {raw!r}"
        return
    if sanitized:
        assert batch.deferred == [0], f"read natively what pydantic changes: {raw!r}"
    if batch.deferred:
        # Deferred but valid: its canonical form is read, but for times the fast path does
        # not take (years outside 1970-2200: ingest then takes the Python path for the batch).
        again = DECODER.extend(batch, [event.model_dump_json().encode()], [0], [0], MAX_EVENT_BYTES)
        times = [t for t in (event.started_at, event.finished_at) if t is not None]
        if again:
            assert any(not 1970 <= t.year <= 2200 for t in times), raw
            return
    assert len(batch) == 1


STORABLE_BASE = {
    "request_id": "r1",
    "model_id": "chat",
    "latency_ms": 5,
    "started_at": "2026-11-29T10:00:00Z",
}


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ({"prompt": "a\x00b"}, "prompt"),
        ({"response": "\ud800 cut"}, "response"),
        ({"prompt": "\udc00\ud800"}, "prompt"),
        ({"metadata": {"k\x00": ["\ud800", {"x": "\x00"}]}}, "metadata"),
        ({"prompt": "\ud83d\ude00", "metadata": {"k": "\u00e9"}}, "native"),
        ({"model_id": "chat\x00"}, "model_id"),
        ({"model_id": "chat\ud800"}, "model_id"),
        ({"request_id": "\x00"}, "request_id"),
        ({"model_version": "v\udfff"}, "model_version"),
        ({"subject_id": "s\x00"}, "subject_id"),
        ({"error_code": "E\x00"}, "error_code"),
        ({"segment": {"locale\x00": "de"}}, "segment"),
        ({"segment": {"locale": "\ud800"}}, "segment"),
        ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages"),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "\udc00"}]},
            "messages",
        ),
        ({"messages": [{"role": "user\x00", "content": "x"}]}, "role"),
    ],
)
def test_nul_and_lone_surrogates_are_decided_by_the_python_validator(
    changes: dict[str, Any], outcome: str
) -> None:
    """Free text (named in ``outcome``) is sanitized, identifiers refused; the fast path
    defers both and reads the sanitized canonical form."""
    assert DECODER is not None
    raw = json.dumps({**STORABLE_BASE, **changes}).encode()
    batch = DECODER.decode([raw], [0], [0], MAX_EVENT_BYTES)
    if outcome == "native":
        assert batch.deferred == [] and len(batch) == 1
        assert codec.decode(raw, InferenceEvent).prompt == "\U0001f600"
        return
    assert batch.deferred == [0]
    sanitized: list[str] = []
    if outcome in ("prompt", "response", "metadata", "messages"):
        event = codec.decode(raw, InferenceEvent, sanitized=sanitized)
        assert sanitized == ["content" if outcome == "messages" else outcome]
        canonical = event.model_dump_json().encode()
        assert "\ufffd" in json.dumps(json.loads(canonical)[outcome], ensure_ascii=False)
        assert DECODER.extend(batch, [canonical], [0], [0], MAX_EVENT_BYTES) == []
        assert len(batch) == 1
        return
    with pytest.raises(SchemaError) as refused:
        codec.decode(raw, InferenceEvent, sanitized=sanitized)
    assert refused.value.reason == "invalid_value" and sanitized == []
    if outcome == "role":  # not an identifier: a value that is none of the roles
        assert str(refused.value).startswith("messages.0.role: Input should be")
        return
    assert str(refused.value).startswith(f"{outcome}: ")
    assert "PostgreSQL text cannot store" in str(refused.value)


def test_repeated_keys_and_oversized_messages_are_deferred() -> None:
    assert DECODER is not None
    repeated = b'{"model_id": "a", "model_id": "b", "latency_ms": 1, "request_id": "r",'
    repeated += b' "started_at": "2026-11-29T10:00:00Z"}'
    segment = b'{"model_id": "a", "latency_ms": 1, "request_id": "r", "segment": {"k": "1",'
    segment += b' "k": "2"}, "started_at": "2026-11-29T10:00:00Z"}'
    big = json.dumps(
        {
            "model_id": "a",
            "latency_ms": 1,
            "request_id": "r",
            "prompt": "x" * 20_000,
            "response": "y" * 20_000,
            "started_at": "2026-11-29T10:00:00Z",
        }
    ).encode()
    batch = DECODER.decode([repeated, segment, big, None], [0] * 4, [1, 2, 3, 4], 30_000)
    assert batch.deferred == [0, 1, 2, 3]


def _stream(seed: int, n: int) -> list[tuple[str, bytes]]:
    """Inferences and feedback: late, future and repeated ones, many segment values."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        t = BASE + timedelta(milliseconds=i * 37 + rng.randint(-25_000, 3_000))
        if rng.random() < 0.01:
            t += timedelta(hours=2)  # beyond windows.max_future_skew_s
        request = f"r{rng.randint(0, n // 2)}"
        model = rng.choice(["a", "b", "c"])
        if rng.random() < 0.15:
            feedback = {
                "request_id": request,
                "model_id": model,
                "created_at": t.isoformat(),
                "score": rng.random(),
                "feedback_id": f"f{i % (n // 3)}",
            }
            if rng.random() < 0.3:
                feedback["correction"] = rng.choice(TEXTS)
            out.append(("feedback", json.dumps(feedback).encode()))
            continue
        event: dict[str, Any] = {
            "request_id": request,
            "model_id": model,
            "model_version": rng.choice(["v1", "v2"]),
            "started_at": t.isoformat().replace("+00:00", rng.choice(["Z", "+00:00"])),
            "prompt": rng.choice(TEXTS),
            "response": rng.choice(TEXTS),
            "latency_ms": round(rng.lognormvariate(5, 1), 3),
            "status": rng.choice(["ok"] * 8 + ["error", "timeout", "truncated"]),
            "segment": {
                k: rng.choice("vwxyz")
                for k in rng.sample(["locale", "tier", "user"], rng.randint(0, 3))
            },
        }
        for name, value in (
            ("time_to_first_token_ms", rng.random() * 100),
            ("prompt_tokens", rng.randint(0, 500)),
            ("completion_tokens", rng.randint(0, 500)),
            ("error_code", rng.choice(["E1", "E2"])),
            ("finish_reason", rng.choice(["stop", "length"])),
            ("subject_id", "s1"),
        ):
            if rng.random() < 0.4:
                event[name] = value
        if rng.random() < 0.4:  # streamed: time per output token, or a first token too late
            event["time_to_first_token_ms"] = event["latency_ms"] * rng.choice([0.1, 0.7, 1, 1.2])
            event["completion_tokens"] = rng.choice([0, 1, 2, 3, 417])
        if rng.random() < 0.3:  # a chat: its turns, cut for the join as prompts are
            event["messages"] = [
                {"role": role, "content": rng.choice(TEXTS)}
                for role in rng.choice([["user"], ["system", "user", "assistant", "user"]])
            ]
        if event["status"] in ("error", "timeout") and rng.random() < 0.5:
            event["response"] = rng.choice(["", " \t\n"])  # errors: not also empty answers
        out.append(("inference", json.dumps(event).encode()))
    return out


def _run(
    stream: list[tuple[str, bytes]], use_native: bool, batch_size: int = 200
) -> tuple[Any, Any, list[dict[str, Any]], list[dict[str, Any]]]:
    settings_ = Settings.model_validate(
        {
            "windows": {
                "tumbling_s": 10,
                "hopping_size_s": 30,
                "hopping_step_s": 10,
                "allowed_lateness_s": 2,
                "idle_timeout_s": 2,
                "expires_s": 600,
                "max_segment_values": 3,
            },
            "feedback": {"join_ttl_s": 60, "join_max_entries": 400, "join_max_text_chars": 24},
            "detectors": {"exemplars_per_window": 4},
        }
    )
    now = [BASE.timestamp() + 100]
    store = DictStore()
    core = WindowState(settings_, store, clock=lambda: now[0], native_joins=use_native)
    decoder = native.decoder_for(core.quality)
    assert decoder is not None
    windows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    offsets = {"inference": 0, "feedback": 0}
    for start in range(0, len(stream), batch_size):
        chunk = stream[start : start + batch_size]
        for kind in ("inference", "feedback"):
            values = [raw for k, raw in chunk if k == kind]
            first = offsets[kind]
            # Every fifth batch is delivered twice (a redelivery after a rebalance).
            rounds = 2 if start // batch_size % 5 == 4 else 1
            for _ in range(rounds):
                if kind == "feedback":
                    items = [
                        (first + j, FeedbackEvent.model_validate_json(v))
                        for j, v in enumerate(values)
                    ]
                    examples += core.on_feedback(0, items).examples
                elif use_native:
                    positions = list(range(first, first + len(values)))
                    batch = decoder.decode(values, [0] * len(values), positions, MAX_EVENT_BYTES)
                    assert batch.deferred == []
                    out = core.on_native_inferences(0, batch)
                    assert out is not None
                    examples += out.examples
                else:
                    items = [
                        (first + j, InferenceEvent.model_validate_json(v))
                        for j, v in enumerate(values)
                    ]
                    examples += core.on_inferences(0, items).examples
            offsets[kind] += len(values)
        now[0] += 1
        windows += core.tick(0).windows
    now[0] += 1000
    windows += core.tick(0).windows
    return store, core, windows, examples


def _state(store: Any) -> dict[str, Any]:
    """A store's or Faust table's records but the join segments, which may split
    differently; the live join entries are compared instead."""
    return {k: v for k, v in store.data.items() if f"{SEP}S{SEP}" not in k}


def _windows(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in w.items() if k != "closed_at"} for w in windows]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_and_python_paths_write_the_same_state(seed: int) -> None:
    stream = _stream(seed, 4000)
    py_store, py_core, py_windows, py_examples = _run(stream, use_native=False)
    nat_store, nat_core, nat_windows, nat_examples = _run(stream, use_native=True)
    assert py_core.counters == nat_core.counters
    counters = nat_core.counters
    # Exact windows: every event is in one tumbling record, late or future (all closed).
    assert counters.windowed_events + counters.late_events + counters.skew_dropped == (
        counters.inference_events
    )
    assert py_core.unaccounted() == nat_core.unaccounted() == 0
    # The stream exercises what it is meant to.
    assert counters.late_events and counters.skew_dropped and counters.redelivered_skipped
    assert counters.joined and counters.join_evicted and counters.segment_overflow
    assert _state(py_store) == _state(nat_store)
    assert _windows(py_windows) == _windows(nat_windows)
    assert any("exemplars" in s for w in nat_windows for s in w["series"])
    series = [s for w in nat_windows for s in w["series"]]
    assert any(s["tpot_ms"]["n"] for s in series) and any("sketches" in s for s in series)
    inferences = [json.loads(raw) for kind, raw in stream if kind == "inference"]
    assert any(e["status"] == "error" and not e["response"].strip() for e in inferences)
    assert py_core._parts[0].joins.entries() == nat_core._parts[0].joins.entries()
    assert py_core._parts[0].joins.pending == nat_core._parts[0].joins.pending
    # The labelled examples, chat turns included (cut to join_max_text_chars as prompts are).
    assert py_examples == nat_examples
    chats = [row for row in nat_examples if row["messages"] is not None]
    assert chats and any(row["correction"] is not None for row in chats)
    assert any(len(turn["content"]) == 24 for row in chats for turn in row["messages"])


def test_panes_restored_ahead_of_the_mark_take_the_python_path() -> None:
    stream = [raw for kind, raw in _stream(4, 300) if kind == "inference"]
    settings_ = Settings()
    store = DictStore()
    core = WindowState(settings_, store, clock=lambda: BASE.timestamp() + 100)
    assert DECODER is not None
    batch = DECODER.decode(stream, [0] * len(stream), list(range(len(stream))), MAX_EVENT_BYTES)
    assert core.on_native_inferences(0, batch) is not None
    # A crash after the panes were written but before the mark: the mark is older.
    mark = f"0{SEP}M"
    store.data[mark] = {**store.data[mark], "off": {"inference": 100}}
    restarted = WindowState(settings_, store, clock=lambda: BASE.timestamp() + 100)
    restarted.restore([0])
    before = dict(store.data)
    again = DECODER.decode(stream, [0] * len(stream), list(range(len(stream))), MAX_EVENT_BYTES)
    assert restarted.on_native_inferences(0, again) is None
    assert store.data == before
    # The Python path skips per pane: nothing is counted twice.
    restarted.on_inferences(
        0, [(i, InferenceEvent.model_validate_json(v)) for i, v in enumerate(stream)]
    )
    for key, value in store.data.items():
        if f"{SEP}P{SEP}" in key:
            assert value["requests"] == before[key]["requests"]


_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_dumps_reads_back_as_json_dumps_does(value: Any) -> None:
    try:
        encoded = native.dumps(value)
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8; the table store falls back to json.dumps.
        assert "\\ud" in json.dumps(value)
        return
    # NaN != NaN, so compare the standard library's text of both readings.
    assert json.dumps(json.loads(encoded)) == json.dumps(json.loads(json.dumps(value)))


def test_dumps_refuses_what_it_cannot_encode() -> None:
    for value in ({1: "a"}, 2**64, {"a": {1, 2}}, b"bytes"):
        with pytest.raises((TypeError, OverflowError)):
            native.dumps(value)


def test_the_pipeline_sink_keeps_the_same_state_from_native_and_pydantic_batches() -> None:
    """Through ingest and the worker's sink (Faust tables, buffered core): a batch decoded
    natively and one decoded by pydantic (``worker.native_ingest`` off) end the same."""
    stream = [raw for kind, raw in _stream(5, 600) if kind == "inference"]
    messages = [
        SimpleNamespace(
            topic="genmon.inference", partition=i % 2, offset=i, key=b"k", value=value, headers=[]
        )
        for i, value in enumerate(stream)
    ]

    async def ingest(native_ingest: bool) -> Any:
        app = create_app(
            Settings.model_validate({"worker": {"native_ingest": native_ingest}}), installers=()
        )
        ingestor, pipeline = Ingestor(app), install_pipeline(app)
        for start in range(0, len(messages), 100):
            batch, dead = ingestor.validate_inferences(messages[start : start + 100])
            assert dead == [] and (batch.native is not None) is native_ingest
            await pipeline.on_inference_batch(batch)
        # The held state, as the pre-commit hook writes it (which then also waits for the
        # broker's acks: none here).
        pipeline.core.flush()
        return pipeline

    native_run, pydantic_run = (asyncio.run(ingest(flag)) for flag in (True, False))
    state = _state(native_run.state_table)
    assert any(f"{SEP}P{SEP}" in key for key in state)
    assert state == _state(pydantic_run.state_table)
    for p in (0, 1):
        native_entries = native_run.core._parts[p].joins.entries()
        assert native_entries == pydantic_run.core._parts[p].joins.entries() != {}


# -- the join table ------------------------------------------------------------------------


def _join_ops(seed: int, tables: list[Any]) -> None:
    """Random operations on ``tables`` (the Python and the native join table), each
    compared as it returns; a restore from the records written so far now and then."""
    rng = random.Random(seed)
    models = ["chat", "slow", "émoji🙂"]
    watermarks = {"chat": 0, "émoji🙂": 0}
    stores: list[dict[int, Any]] = [{} for _ in tables]
    floors_written: dict[str, tuple[int, str]] = {}
    feedback_ids = 0

    def same(results: list[Any]) -> Any:
        assert all(result == results[0] for result in results[1:]), results
        return results[0]

    def pairs(result: list[Any]) -> list[tuple[Any, ...]]:
        return [tuple(pair) for pair in result]

    for step in range(1500):
        op = rng.random()
        model = rng.choice(models)
        request = f"r{rng.randrange(120)}"
        t = step * 100 + rng.randrange(-3000, 500)
        if op < 0.45:
            record = {
                "version": rng.choice(["v1", "v2"]),
                "prompt": rng.choice(TEXTS)[: rng.randrange(0, 40)],
                "response": rng.choice(TEXTS),
                "segment": dict(rng.sample([("locale", "fr"), ("tier", "pro"), ("é", "ü")], 2)),
                "subject": rng.choice([None, "user-1"]),
                "t": t,
            }
            if rng.random() < 0.4:  # records written before chat messages existed have none
                record["messages"] = [
                    {"role": role, "content": rng.choice(TEXTS)}
                    for role in rng.choice([[], ["user"], ["system", "user", "assistant"]])
                ]
            same([pairs(table.add_inference(model, request, dict(record))) for table in tables])
        elif op < 0.75:
            feedback_ids += 1
            record = {
                "id": f"f{rng.randrange(feedback_ids + 1)}",
                "score": rng.choice([None, 0.0, 0.25, 1.0, 1 / 3]),
                "label": rng.choice([None, "wrong"]),
                "correction": rng.choice([None, 'Ça va "bien"\n']),
                "segment": {"locale": "de"},
                "subject": None,
                "t": t,
            }
            same([pairs(table.add_feedback(model, request, dict(record))) for table in tables])
        elif op < 0.82:
            watermarks[model] = max(watermarks.get(model, 0), step * 100 - 2000)
            same([table.expire(dict(watermarks)) for table in tables])
        elif op < 0.9:
            cap = rng.randrange(20, 80)
            same([table.evict(cap, dict(watermarks)) for table in tables])
        elif op < 0.96:
            max_bytes = rng.choice([300, 3000, 256 * 1024])
            written = [table.segments(max_bytes) for table in tables]
            same([[(seq, record_entries(value)) for seq, value in w] for w in written])
            dead = same([table.take_dead() for table in tables])
            floors_written = dict(tables[0].floors)
            for store, records in zip(stores, written, strict=True):
                store.update(records)
                for seq in dead:
                    del store[seq]
        elif op < 0.98:
            same([table.forget({model}) for table in tables])
        else:  # a restart: rebuild each table from what it wrote
            rebuilt = []
            for table, store in zip(tables, stores, strict=True):
                fresh = type(table)(table.ttl_ms, table.max_text_chars)
                records = [(seq, record_entries(value)) for seq, value in store.items()]
                fresh.restore(records, dict(watermarks), floors_written)
                rebuilt.append(fresh)
            for store, dead in zip(stores, [t.take_dead() for t in rebuilt], strict=True):
                for seq in dead:
                    del store[seq]
            tables[:] = rebuilt
        same([table.entries() for table in tables])
        same([(len(table), table.pending, table.models(), table.floors) for table in tables])


@pytest.mark.parametrize("seed", range(6))
def test_the_native_join_table_behaves_as_the_python_one(seed: int) -> None:
    tables = [JoinTable(5000, 16), native.join_table(5000, 16)]
    _join_ops(seed, tables)


def test_sketch_keys_match_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from genmon.detectors import sketch as sketch_module

    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.lognormal(6.0, 0.5, 200_000),
            np.round(rng.lognormal(4.0, 2.0, 200_000), 1),
            rng.uniform(-5.0, 5000.0, 50_000),
            [0.0, 1e-320, 3.0e300],
        ]
    )
    compiled = sketch_module.QuantileSketch()
    compiled.add_many(values)
    monkeypatch.setattr(sketch_module, "sketch_values", None)
    vectorised = sketch_module.QuantileSketch()
    vectorised.add_many(values)
    assert compiled.bins == vectorised.bins
    assert list(compiled.bins) == sorted(compiled.bins)  # numpy's order: to_state alike
    assert (compiled.zeros, compiled.count) == (vectorised.zeros, vectorised.count)
    assert (compiled.min, compiled.max) == (vectorised.min, vectorised.max)
    assert compiled.sum == pytest.approx(vectorised.sum, rel=1e-12)
