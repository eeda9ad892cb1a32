"""The worker's Prometheus metrics, in a registry owned by one app.

Served by the Faust web server at ``GET /metrics`` (Prometheus text format) and
``GET /stats`` (the same numbers as JSON: an ``ingest`` summary plus every sample).
Add a pipeline's metrics as attributes of :class:`WorkerMetrics` or register them
on ``WorkerMetrics.registry``; both endpoints pick them up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["PROMETHEUS_CONTENT_TYPE", "WorkerMetrics"]


class WorkerMetrics:
    """Counters of one worker app. A fresh registry per app keeps tests independent."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ingest_valid = Counter(
            "genmon_ingest_valid", "Messages accepted by the ingest agents", ["topic"], registry=r
        )
        self.ingest_invalid = Counter(
            "genmon_ingest_invalid",
            "Messages rejected by the ingest agents, by reason code",
            ["topic", "reason"],
            registry=r,
        )
        self.ingest_sanitized = Counter(
            "genmon_ingest_sanitized",
            "Accepted messages whose free text held NUL or lone surrogates, replaced by U+FFFD",
            ["topic"],
            registry=r,
        )
        self.sequence_gaps = Counter(
            "genmon_ingest_sequence_gaps",
            "Events missing from a producer's sequence (lost or dropped by the SDK)",
            ["topic"],
            registry=r,
        )
        self.out_of_order = Counter(
            "genmon_ingest_out_of_order",
            "Events that arrived after a later event of the same producer and model",
            ["topic"],
            registry=r,
        )
        self.duplicates = Counter(
            "genmon_ingest_duplicates",
            "Events whose producer sequence number was seen just before (redelivery)",
            ["topic"],
            registry=r,
        )
        self.deadletter_sent = Counter(
            "genmon_deadletter_sent", "Dead-letter records written", registry=r
        )
        self.deadletter_failed = Counter(
            "genmon_deadletter_failed",
            "Dead-letter records that could not be written (the rejected message is lost)",
            registry=r,
        )
        self.sink_errors = Counter(
            "genmon_sink_errors",
            "Batches an ingest sink raised on (the sink missed those events)",
            ["kind", "sink"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "genmon_ingest_batch_seconds",
            "Time to validate one batch and hand it to the sinks",
            ["kind"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )

    def prometheus_text(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The ``/stats`` document: an ``ingest`` summary and every sample by name."""
        samples: dict[str, Any] = {}
        by_label: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                value = _plain(sample.value)
                if sample.labels and value is not None:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    samples.setdefault(sample.name, {})[labels] = value
                    for key, label in sample.labels.items():
                        per = by_label[(sample.name, key)]
                        per[label] = per.get(label, 0) + value
                elif not sample.labels:
                    samples[sample.name] = value

        def total(name: str) -> int:
            return int(sum(by_label[(name, "topic")].values()))

        ingest = {
            "valid": total("genmon_ingest_valid_total"),
            "invalid": total("genmon_ingest_invalid_total"),
            "valid_by_topic": by_label[("genmon_ingest_valid_total", "topic")],
            "invalid_by_topic": by_label[("genmon_ingest_invalid_total", "topic")],
            "invalid_by_reason": by_label[("genmon_ingest_invalid_total", "reason")],
            "sanitized": total("genmon_ingest_sanitized_total"),
            "gaps": total("genmon_ingest_sequence_gaps_total"),
            "out_of_order": total("genmon_ingest_out_of_order_total"),
            "duplicates": total("genmon_ingest_duplicates_total"),
            "deadletter_sent": int(samples.get("genmon_deadletter_sent_total", 0)),
            "deadletter_failed": int(samples.get("genmon_deadletter_failed_total", 0)),
            "sink_errors": int(sum(by_label[("genmon_sink_errors_total", "kind")].values())),
        }
        return {"ingest": ingest, "metrics": samples}


def _plain(value: float) -> float | int | None:
    """JSON-safe: whole numbers as ints, infinities and NaN as null."""
    if math.isnan(value) or math.isinf(value):
        return None
    return int(value) if value.is_integer() else value
