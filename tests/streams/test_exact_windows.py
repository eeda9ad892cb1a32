"""Every accepted inference is in exactly one tumbling window record; every other one is
counted late or future: through backlogs, stalls, restarts and strange timestamps.

The window state alone, on a dict store, with 10 s tumbling and 20 s / 10 s hopping
windows and 1 s allowed lateness (``pipeline_support.WINDOWS``). The same guarantee on the
real broker, frozen and stopped mid-stream, is in ``tests/faults``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pipeline_support import WINDOWS

from genmon.schemas.events import MAX_EVENT_BYTES, InferenceEvent
from genmon.settings import Settings
from genmon.streams import native
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import DictStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0.timestamp() + 3600


def inference(i: int, t_s: float, model: str = "chat") -> InferenceEvent:
    return InferenceEvent(
        request_id=f"r{i}",
        model_id=model,
        latency_ms=0.0,
        response="fine",
        started_at=T0 + timedelta(seconds=t_s),
    )


def core_at(now: list[float], store: DictStore | None = None, **windows: Any) -> WindowState:
    settings = Settings(windows={**WINDOWS, **windows})
    return WindowState(settings, store or DictStore(), clock=lambda: now[0])


def tumbling_requests(windows: list[dict[str, Any]]) -> dict[int, int]:
    start = int(T0.timestamp() * 1000)
    return {
        (w["start_ms"] - start) // 1000: next(s for s in w["series"] if s["segment"] == "*")[
            "requests"
        ]
        for w in windows
        if w["kind"] == "tumbling"
    }


@pytest.mark.parametrize("path", ["python", "native"])
def test_a_backlog_after_its_tumbling_window_closed_is_counted_late_not_lost(path: str) -> None:
    """The race the broker outage showed: a stall let the wall clock close tumbling
    [0,10) while hopping [0,20) stayed open; the backlog then went into the pane,
    in no tumbling record and no counter (4 % of events after a 30 s freeze)."""
    if path == "native" and not native.available():
        pytest.skip("the native module is not built")
    now = [NOW]
    settings = Settings(windows={**WINDOWS, "idle_timeout_s": 2})
    core = WindowState(settings, DictStore(), clock=lambda: now[0], native_joins=path == "native")
    core.on_inferences(0, [(i, inference(i, i)) for i in range(5)])  # 0..4 s
    now[0] += 3  # no events for 3 s: the idle clock closes [0,10) by the wall clock
    assert tumbling_requests(core.tick(0).windows) == {}
    now[0] += 10
    assert tumbling_requests(core.tick(0).windows) == {0: 5}
    backlog = [(i, inference(i, i)) for i in range(5, 10)]  # 5..9 s, arriving now
    if path == "native":
        decoder = native.decoder_for(core.quality)
        values = [event.model_dump_json().encode() for _, event in backlog]
        batch = decoder.decode(values, [0] * 5, [o for o, _ in backlog], MAX_EVENT_BYTES)
        assert core.on_native_inferences(0, batch) is not None
    else:
        core.on_inferences(0, backlog)
    assert core.counters.late_events == 5
    assert core.unaccounted() == 0
    core.on_inferences(0, [(10, inference(10, 40))])
    windows = core.tick(0).windows
    assert tumbling_requests(windows) == {}  # no window holds the late ones
    assert all(s["requests"] <= 5 for w in windows for s in w["series"])
    assert core.counters.windowed_events + core.counters.late_events == 10


def test_the_idle_clock_stands_still_while_the_partition_is_not_caught_up() -> None:
    now = [NOW]
    core = core_at(now, idle_timeout_s=2)
    core.on_inferences(0, [(i, inference(i, i)) for i in range(5)])
    for _ in range(10):  # a broker that does not answer for 30 s
        now[0] += 3
        assert core.due_windows(0, caught_up_since=None) == []
    now[0] += 1  # answering again: the idle clock runs from then, not from the last event
    since = now[0]
    assert core.due_windows(0, caught_up_since=since) == []
    now[0] += 30  # a tick that was held up for 30 s cannot vouch for them: the worker
    assert core.due_windows(0, caught_up_since=now[0]) == []  # passes its own time
    core.on_inferences(0, [(i, inference(i, i)) for i in range(5, 10)])  # the backlog
    assert core.counters.late_events == 0
    now[0] += 3  # idle (and caught up) for 3 s: the watermark moves past [0,10)'s close
    assert tumbling_requests(core.due_windows(0, caught_up_since=since)) == {0: 10}


def test_a_closed_window_is_sent_again_as_it_was_after_a_crash_before_the_ack() -> None:
    """The outbox: a window's record is decided once. Without it the restarted worker
    recomputed the window from the panes of the last flush plus whatever had arrived by
    then, and sent a second, different record for the same window."""
    now = [NOW]
    store = DictStore()
    core = core_at(now, store)
    core.on_inferences(0, [(i, inference(i, i)) for i in range(5)])
    core.on_inferences(0, [(5, inference(5, 12))])
    first = core.due_windows(0)
    assert tumbling_requests(first) == {0: 5}
    # The worker flushed (a DictStore writes through), then crashed before the broker
    # acknowledged the record. The backlog is read again after the restart.
    restarted = core_at(now, store)
    restarted.restore([0])
    restarted.on_inferences(0, [(6, inference(6, 7))])  # for [0,10), arriving after it closed
    again = restarted.due_windows(0)
    assert [w for w in again if w["kind"] == "tumbling"] == [
        w for w in first if w["kind"] == "tumbling"
    ]
    restarted.windows_sent(0, again)
    assert restarted.due_windows(0) == []
    assert restarted.counters.late_events == 1
    assert not any("\x1fW\x1f" in key for key in store.data)


def test_a_1970_stamp_is_late_among_todays_events_even_as_a_models_first() -> None:
    now = [NOW]
    core = core_at(now)
    epoch = -T0.timestamp()  # 1970-01-01 in seconds from T0
    core.on_inferences(0, [(0, inference(0, epoch, "new")), (1, inference(1, 1, "new"))])
    core.on_inferences(0, [(2, inference(2, 2, "new")), (3, inference(3, epoch, "new"))])
    assert core.counters.late_events == 2
    core.on_inferences(0, [(4, inference(4, 40, "new"))])
    windows = core.tick(0).windows
    assert min(w["start_ms"] for w in windows) >= int(T0.timestamp() * 1000) - 10_000
    assert tumbling_requests(windows) == {0: 2}


def test_a_replay_of_last_months_dump_is_not_late() -> None:
    now = [NOW + 30 * 86400]
    core = core_at(now)
    core.on_inferences(0, [(i, inference(i, i / 10)) for i in range(100)])
    core.on_inferences(0, [(100, inference(100, 40))])
    assert core.counters.late_events == 0
    assert tumbling_requests(core.tick(0).windows) == {0: 100}
