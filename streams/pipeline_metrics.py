"""The pipeline's operational signals, on the worker's Prometheus registry.

The pure cores count what they do in plain integers (:class:`WindowState.counters
<genmon.streams.windows.state.WindowState>`, ``DetectorRunner.series_evicted``), so that
tests and ``genmon replay`` need no registry; :class:`PipelineMetrics` carries those
counts over to Prometheus after each batch, window closing or detector run of the worker
(:mod:`genmon.streams.pipeline`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from genmon.streams.detection.runner import DetectorRunner
    from genmon.streams.windows.state import WindowState


log = logging.getLogger(__name__)


class PipelineMetrics:
    """Operational signals of the pipeline, on the worker's Prometheus registry."""

    def __init__(self, registry: Any) -> None:
        r = registry
        self.events = Counter("genmon_pipeline_events", "Events aggregated", ["kind"], registry=r)
        self.events_per_s = Gauge(
            "genmon_pipeline_events_per_second",
            "Inference events aggregated per second (last interval)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "genmon_pipeline_consumer_lag",
            "Messages behind the end of each owned source partition",
            ["topic", "partition"],
            registry=r,
        )
        self.late = Counter(
            "genmon_pipeline_late_events",
            "Events whose windows had all closed",
            ["kind"],
            registry=r,
        )
        self.skew = Counter(
            "genmon_pipeline_future_events",
            "Events dropped for timestamps beyond windows.max_future_skew_s",
            registry=r,
        )
        self.redelivered = Counter(
            "genmon_pipeline_redelivered_skipped",
            "Redelivered events skipped (already aggregated)",
            registry=r,
        )
        self.windows_closed = Counter(
            "genmon_pipeline_windows_closed", "Closed windows emitted", ["kind"], registry=r
        )
        self.windowed = Counter(
            "genmon_pipeline_windowed_events",
            "Requests in the all-traffic series of closed tumbling windows",
            registry=r,
        )
        self.unaccounted = Gauge(
            "genmon_pipeline_unaccounted_events",
            "Requests added to panes that no tumbling window holds or will hold (the "
            "exact-windows invariant: anything but 0 is a bug)",
            registry=r,
        )
        self.joined = Counter("genmon_join_joined", "Feedback joined to its inference", registry=r)
        self.orphaned = Counter(
            "genmon_join_orphaned", "Feedback dropped at the TTL without its inference", registry=r
        )
        self.segment_overflow = Counter(
            "genmon_pipeline_segment_overflow",
            "Attribute values of events counted as <attribute>=__other__ because the model"
            " had windows.max_segment_values values of the attribute in live panes",
            registry=r,
        )
        self.segment_folded = Counter(
            "genmon_pipeline_segment_values_folded",
            "Segment values of closing windows folded into <attribute>=__other__ to keep"
            " the window record within its size budget",
            registry=r,
        )
        self.series_evicted = Counter(
            "genmon_detector_series_evicted",
            "Detector series dropped from a model's window state or embedding drift state:"
            " not judged for detectors.series_ttl_s of event time (ttl), beyond"
            " detectors.max_series_per_model or detectors.max_embedding_series_per_model"
            " (cap) or over the window state's size bound (size)",
            ["reason"],
            registry=r,
        )
        self.evicted = Counter(
            "genmon_join_evicted",
            "Join entries evicted before their TTL to stay within feedback.join_max_entries",
            registry=r,
        )
        self.pending = Gauge(
            "genmon_join_pending",
            "Join entries holding feedback that waits for its inference",
            registry=r,
        )
        self.entries = Gauge(
            "genmon_join_entries",
            "Live join entries (at most feedback.join_max_entries per partition)",
            registry=r,
        )
        self.examples = Counter(
            "genmon_join_examples_written",
            "Labelled example rows inserted: new rows only, a duplicate of a stored"
            " (model, request) is not counted",
            registry=r,
        )
        self.examples_pending = Gauge(
            "genmon_join_examples_pending",
            "Labelled example rows this worker holds in memory until the database or the"
            " retry topic has them (those waiting in <prefix>.examples-retry are its lag)",
            registry=r,
        )
        self.examples_deferred = Counter(
            "genmon_join_examples_deferred",
            "Labelled example rows handed to <prefix>.examples-retry to wait for the database",
            registry=r,
        )
        self.examples_failed = Counter(
            "genmon_join_examples_failed",
            "Labelled example rows (or unreadable retry records) that can never be stored:"
            " logged with the reason and dead-lettered",
            registry=r,
        )
        self.example_errors = Counter(
            "genmon_join_example_errors",
            "Inserts of labelled examples that failed: transient (the rows wait and are"
            " retried) or permanent (a refused row; the statement is split to isolate it)",
            ["kind"],
            registry=r,
        )
        self.findings = Counter(
            "genmon_findings_published", "Findings published", ["detected"], registry=r
        )
        self.early_findings = Counter(
            "genmon_early_findings_total",
            "Firing findings published from a look at an open window (early detection)",
            registry=r,
        )
        self.close_to_finding = Histogram(
            "genmon_window_close_to_finding_seconds",
            "From closing a window to publishing its findings",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._last: dict[str, int] = {}
        self._last_tick = time.monotonic()
        self._last_events = 0

    def sync_runner(self, runner: DetectorRunner) -> None:
        """Carry the runner's eviction counts over (they only grow)."""
        for reason, value in runner.series_evicted.items():
            name = f"series_evicted_{reason}"
            delta = value - self._last.get(name, 0)
            if delta:
                self.series_evicted.labels(reason).inc(delta)
            self._last[name] = value

    def sync_invariant(self, core: WindowState) -> None:
        """Check the exact-windows invariant (a scan of the all-traffic panes: once per
        closing tick, not per batch) and log when it breaks."""
        unaccounted = core.unaccounted()
        if unaccounted and unaccounted != self._last.get("unaccounted", 0):
            log.error(
                "%d requests entered panes whose tumbling window had closed: they are in "
                "no window record and no late counter",
                unaccounted,
            )
        self._last["unaccounted"] = unaccounted
        self.unaccounted.set(unaccounted)

    def sync(self, core: WindowState) -> None:
        """Carry the core's counters over (they only grow) and refresh the gauges."""
        c = core.counters
        for name, value, metric in (
            ("inference", c.inference_events, self.events.labels("inference")),
            ("feedback", c.feedback_events, self.events.labels("feedback")),
            ("late", c.late_events, self.late.labels("inference")),
            ("late_feedback", c.late_feedback, self.late.labels("feedback")),
            ("skew", c.skew_dropped, self.skew),
            ("redelivered", c.redelivered_skipped, self.redelivered),
            ("windowed", c.windowed_events, self.windowed),
            ("joined", c.joined, self.joined),
            ("orphaned", c.orphaned, self.orphaned),
            ("evicted", c.join_evicted, self.evicted),
            ("segment_overflow", c.segment_overflow, self.segment_overflow),
            ("segment_folded", c.segment_folded, self.segment_folded),
        ):
            delta = value - self._last.get(name, 0)
            if delta:
                metric.inc(delta)
            self._last[name] = value
        self.pending.set(core.pending_feedback)
        self.entries.set(core.join_entries)
        now = time.monotonic()
        if now - self._last_tick >= 1.0:
            self.events_per_s.set(
                (c.inference_events - self._last_events) / (now - self._last_tick)
            )
            self._last_tick, self._last_events = now, c.inference_events
