"""The feedback join keeps at most ``feedback.join_max_entries`` entries per partition."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from genmon.schemas.events import FeedbackEvent, InferenceEvent
from genmon.settings import Settings
from genmon.streams.windows.join import JoinTable, record_entries
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import SEP, DictStore

pytestmark = pytest.mark.usefixtures("join_tables")

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0.timestamp() + 3600


def inf(rid: str, t_s: float, model: str = "chat") -> InferenceEvent:
    return InferenceEvent(
        request_id=rid,
        model_id=model,
        model_version="v1",
        latency_ms=10.0,
        prompt="p" * 50,
        response="r" * 50,
        started_at=T0 + timedelta(seconds=t_s),
    )


def fb(rid: str, t_s: float, fid: str, model: str = "chat") -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=fid,
        request_id=rid,
        model_id=model,
        thumbs="up",
        created_at=T0 + timedelta(seconds=t_s),
    )


def make_core(cap: int, store: DictStore | None = None, ttl_s: float = 30) -> WindowState:
    settings = Settings(
        windows={
            "tumbling_s": 10,
            "hopping_size_s": 10,
            "hopping_step_s": 10,
            "allowed_lateness_s": 1,
            "idle_timeout_s": 1000,
        },
        feedback={"join_ttl_s": ttl_s, "join_max_text_chars": 20, "join_max_entries": cap},
    )
    return WindowState(settings, store or DictStore(), clock=lambda: NOW)


def restarted(core: WindowState, cap: int) -> WindowState:
    """A new worker recovering the partition from (a copy of) the changelog records."""
    store = DictStore()
    store.data = dict(core.store.data)
    fresh = make_core(cap, store)
    fresh.restore([0])
    return fresh


def joined_ids(out) -> list[str]:
    return [row["request_id"] for row in out.examples]


def stored_entries(core: WindowState) -> list[str]:
    """Join keys in the segment records the store still holds (live or not)."""
    return [
        key
        for record_key, record in core.store.data.items()
        if record_key.split(SEP)[1] == "S"
        for key in record_entries(record)
    ]


def test_over_the_cap_the_soonest_expiring_entries_go_and_their_feedback_is_orphaned():
    core = make_core(cap=3)
    core.on_feedback(0, [(0, fb("ghost", 1, "g1")), (1, fb("ghost", 1, "g2"))])  # exp 31
    core.on_inferences(0, [(0, inf("a", 5)), (1, inf("b", 2)), (2, inf("c", 3))])
    assert core.join_entries == 3
    assert (core.counters.join_evicted, core.counters.orphaned) == (1, 2)  # ghost went
    assert core.pending_feedback == 0
    assert joined_ids(core.on_feedback(0, [(2, fb("b", 6, "fb0"))])) == ["b"]  # b now exp 36
    core.on_inferences(0, [(3, inf("d", 7))])  # c (exp 33) expires soonest, not b
    assert core.counters.join_evicted == 2
    out = core.on_feedback(0, [(3, fb(k, 8, f"f{k}")) for k in ("a", "b", "c", "d")])
    assert joined_ids(out) == ["a", "b", "d"]  # c was evicted: its feedback now waits
    assert core.pending_feedback == 1
    assert core.join_entries == 3 and core.counters.join_evicted == 3  # a (exp 35) went
    assert core.counters.orphaned == 2


def test_soonest_is_measured_against_each_models_own_watermark():
    core = make_core(cap=2)
    # "slow"'s producer runs 1000 s behind: its entry's exp is far smaller in absolute
    # time, yet it has as long to live as the others against its own watermark.
    core.on_inferences(0, [(0, inf("x", 1000)), (1, inf("y", 0, model="slow"))])
    core.on_inferences(0, [(2, inf("z", 1001))])
    assert core.counters.join_evicted == 1
    out = core.on_feedback(0, [(0, fb("y", 1, "fy", model="slow")), (1, fb("x", 1001, "fx"))])
    assert joined_ids(out) == ["y"]


def test_the_entry_count_stays_within_the_cap_across_many_batches():
    cap, batch = 50, 20
    core = make_core(cap, ttl_s=3600)  # nothing expires: only the cap bounds the join
    for n in range(100):
        rids = [f"r{n}-{i}" for i in range(batch)]
        core.on_inferences(0, [(n * batch + i, inf(rid, n)) for i, rid in enumerate(rids)])
        assert core.join_entries <= cap
        previous = [f"r{n - 1}-{i}" for i in range(0, batch, 2)] if n else []
        out = core.on_feedback(
            0, [(n * batch + i, fb(r, n, f"f{r}")) for i, r in enumerate(previous)]
        )
        assert len(out.examples) == len(previous)  # the newest entries are the ones kept
        assert core.join_entries <= cap
        # Records of evicted entries are deleted unless they still hold a live entry.
        assert len(stored_entries(core)) <= cap + batch
    assert core.counters.join_evicted == 100 * batch - cap


def test_heaps_stay_bounded_while_the_same_entries_are_refreshed():
    core = make_core(cap=100, ttl_s=3600)
    core.on_inferences(0, [(i, inf(f"r{i}", 0)) for i in range(10)])
    for n in range(1, 201):  # every feedback moves its entry's expiry: one heap item each
        core.on_feedback(0, [(n * 10 + i, fb(f"r{i}", n, f"f{n}-{i}")) for i in range(10)])
    table = core._parts[0].joins
    if isinstance(table, JoinTable):  # the native table keeps one ordered item per entry
        assert sum(len(heap) for heap in table._heaps.values()) <= 2 * 10 + 1024
    assert core.join_entries == 10
    assert core.counters.join_evicted == 0


def test_evicted_entries_do_not_come_back_after_a_restart():
    core = make_core(cap=3)
    core.on_inferences(0, [(0, inf("a", 1)), (1, inf("b", 2)), (2, inf("c", 3))])
    core.on_inferences(0, [(3, inf("d", 4))])  # evicts a
    assert core.counters.join_evicted == 1
    # a's record stays (b and c are live in it): only the mark says a is gone.
    assert "chat\x1fa" in stored_entries(core)

    again = restarted(core, cap=3)
    assert again.join_entries == 3 and again.counters.join_evicted == 0
    out = again.on_feedback(0, [(0, fb("a", 5, "fa")), (1, fb("b", 5, "fb"))])
    assert joined_ids(out) == ["b"] and again.pending_feedback == 1

    lowered = restarted(core, cap=2)  # a lowered cap evicts on recovery (b, exp 32)
    assert lowered.join_entries == 2 and lowered.counters.join_evicted == 1
    lowered.tick(0)  # writes the mark with the new floor
    after = restarted(lowered, cap=2)
    assert after.join_entries == 2 and after.counters.join_evicted == 0
    out = after.on_feedback(0, [(0, fb("b", 5, "fb")), (1, fb("c", 5, "fc"))])
    assert joined_ids(out) == ["c"]


def test_a_restart_recovers_exactly_the_live_entries_of_a_disordered_stream():
    rng = random.Random(11)
    cap = 40
    core = make_core(cap)
    lag = {"chat": 0.0, "slow": -500.0}  # slow's producer runs behind
    offsets = {"inference": 0, "feedback": 0}
    n_feedback = expired = 0
    for step in range(60):
        events = []
        for _ in range(6):
            model = rng.choice(("chat", "slow"))
            t = lag[model] + step * 5 + rng.uniform(-20, 5)
            events.append((offsets["inference"], inf(f"r{rng.randrange(80)}", t, model)))
            offsets["inference"] += 1
        core.on_inferences(0, events)
        assert core.join_entries <= cap
        feedback = []
        for _ in range(3):
            model = rng.choice(("chat", "slow"))
            t = lag[model] + step * 5 + rng.uniform(-5, 5)
            feedback.append(
                (offsets["feedback"], fb(f"r{rng.randrange(80)}", t, f"f{n_feedback}", model))
            )
            offsets["feedback"] += 1
            n_feedback += 1
        core.on_feedback(0, feedback)
        assert core.join_entries <= cap
        before = core.join_entries
        core.tick(0)  # expires what the watermark passed, as a restore would
        expired += before - core.join_entries
        assert restarted(core, cap)._parts[0].joins.entries() == core._parts[0].joins.entries()
    # The stream went through every path: eviction, expiry, joins and orphans.
    c = core.counters
    assert c.join_evicted > 0 and expired > 0 and c.orphaned > 0 and c.joined > 0


def test_a_late_entry_at_or_below_the_eviction_floor_is_evicted_even_under_the_cap():
    core = make_core(cap=4)
    events = [inf("a", 10), inf("b", 11), inf("s", 0, "slow"), inf("q", 1, "slow")]
    core.on_inferences(0, list(enumerate(events)))
    core.on_inferences(0, [(4, inf("c", 12))])  # evicts a: chat's floor is (exp 40 s, a)
    core.on_inferences(0, [(5, inf("q", 35, "slow"))])  # slow's watermark passes s
    core.tick(0)
    assert core.join_entries == 3 and core.counters.join_evicted == 1
    # z (exp 35 s) lies below chat's floor though above its watermark (12 s): a restore
    # would drop it, so it must not live now either.
    core.on_inferences(0, [(6, inf("z", 5))])
    assert core.join_entries == 3 and core.counters.join_evicted == 2
    assert restarted(core, cap=4).join_entries == 3
    assert joined_ids(core.on_feedback(0, [(0, fb("z", 6, "fz"))])) == []
