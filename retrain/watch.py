"""The rollout watcher: judges each watching challenger on the worker's closed windows, and
acts on the verdict (roll back, confirm, or give up).

It runs inside ``genmon worker --role retrain`` beside the retrain agent
(:mod:`genmon.retrain.runner`), as one thread with a kafka-python consumer (group
``<worker.app_id>-rollout``, offsets committed by hand) of the worker's internal
``<prefix>.windows`` topic: every closed tumbling window of every model, per version and
segment. A window of a model with a *watching* rollout (:mod:`genmon.retrain.rollout`) that
closed after the rollout started is fed to that rollout's
:class:`~genmon.detectors.rollout.RolloutWatch`, whose state is stored in the rollout's row
before the window's offset is committed. The watch ignores a window it already applied (a
redelivery after a crash), so a window counts once.

The verdicts, each acted on once (the row's status changes in the same transaction as the
alias move, and a rollout that is no longer watching gets no more windows):

- **regressed**: a finding (detector ``rollout_watch``, severity error, the challenger's
  version, the worst comparison's signal and segment) goes to ``<prefix>.findings``, so the
  incident manager opens an incident and pages on-call. Its id and window are derived from
  the rollout, so a finding published again after a crash is the same finding (deduplicated
  by the incident manager). Then, as the policy's ``rollout.on_regression`` says:
  ``rollback`` (the default) unsets the challenger and marks its version ``rolled_back``
  (:func:`~genmon.retrain.rollout.rollback_rollout`) and announces it, so serving stops
  sending it traffic; ``page`` leaves the decision to a person (``genmon models rollback``).
- **clean**: the planned watch ended with nothing flagged: the challenger becomes champion,
  the old champion ``previous`` (:func:`~genmon.retrain.rollout.confirm_rollout`).
- **inconclusive**: ``max_watch_s`` of traffic passed without the planned evidence: the
  challenger is withdrawn and the champion keeps serving (safe by default).

The watch's planned length appears once the first windows give a rate of traffic: it is
logged ("watch about 40 minutes at current traffic") and stored on the row, where
``genmon models rollouts`` shows it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from genmon import kafka_config
from genmon.detectors.rollout import RolloutWatch, WatchResult, watch_minutes_text
from genmon.exceptions import GenmonError
from genmon.retrain.policy import RetrainPolicy
from genmon.retrain.rollout import (
    ROLLOUT_DETECTOR,
    active_rollouts,
    confirm_rollout,
    end_rollout,
    rollback_rollout,
    save_watch,
)
from genmon.schemas.codec import encode
from genmon.schemas.events import Finding, FindingKind, RolloutStatus, Severity
from genmon.schemas.retrain import Rollout
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: The detector name of a rollout's findings (the retrain policy never retrains on them).
DETECTOR = ROLLOUT_DETECTOR
#: Pause before a window that failed is tried again.
RETRY_PAUSE_S = 2.0
#: How long the list of watching rollouts is reused before it is read again.
ROLLOUTS_TTL_S = 1.0
PUBLISH_TIMEOUT_S = 30.0
#: Recent tumbling windows kept per model (15 minutes of default windows), for the
#: forecast at a rollout's start...
RECENT_WINDOWS = 15
#: ... of at most this many models (the least recently seen are forgotten first).
RECENT_MODELS = 256
#: What a remembered window keeps of each series: the counts the forecast reads.
_COUNTS = ("model_version", "segment", "requests", "errors", "answered", "refusal", "feedback")


def new_watch(rollout: Rollout, policy: RetrainPolicy) -> RolloutWatch:
    """A fresh watch of ``rollout`` with the model's rollout policy."""
    config = policy.for_model(rollout.model_id).rollout
    return RolloutWatch(
        champion=rollout.champion,
        challenger=rollout.challenger,
        share=rollout.share,
        alpha=config.alpha,
        power=config.power,
        min_regression=dict(config.min_regression),
        min_segment_share=config.min_segment_share,
        max_watch_s=config.max_watch_s,
    )


def _watch_of(rollout: Rollout, policy: RetrainPolicy) -> RolloutWatch:
    return RolloutWatch.from_state(rollout.state) if rollout.state else new_watch(rollout, policy)


def _closed_after_start(record: dict[str, Any], rollout: Rollout) -> bool:
    """Whether the window closed after the rollout started (earlier ones, replayed from the
    topic, were served before the challenger existed)."""
    closed = record.get("closed_at")
    if not isinstance(closed, str):
        return True
    at = datetime.fromisoformat(closed)
    started = rollout.started_at
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return at >= started


def regression_finding(rollout: Rollout, result: dict[str, Any], action: str) -> Finding:
    """The finding of a regressed watch: one id per rollout, so it is published once in
    effect however often a crash makes the watcher publish it again."""
    worst = result.get("worst") or {}
    segment = worst.get("segment")
    end_ms = int(result.get("decided_end_ms") or 0)
    q = worst.get("q_value")
    alpha = float(result.get("alpha") or 0.05)
    return Finding(
        finding_id=f"rollout-{rollout.rollout_id}",
        model_id=rollout.model_id,
        model_version=rollout.challenger,
        detector=DETECTOR,
        kind=FindingKind.QUALITY,
        signal=str(worst.get("signal") or "rollout"),
        segment=None if segment in (None, "*") else str(segment),
        window_start=datetime.fromtimestamp(rollout.watch_from_ms / 1000, UTC)
        if rollout.watch_from_ms
        else None,
        window_end=datetime.fromtimestamp(end_ms / 1000, UTC) if end_ms else None,
        score=_neg_log10(q),
        threshold=_neg_log10(alpha),
        detected=True,
        p_value=worst.get("p_value"),
        effect_size=worst.get("difference"),
        n_seen=int(worst.get("challenger_n") or 0),
        severity=Severity.ERROR,
        title=f"{result.get('title', 'Challenger regressed')}; {action}"[:512],
        evidence={
            "rollout_id": rollout.rollout_id,
            "champion": rollout.champion,
            "challenger": rollout.challenger,
            "traffic_share": rollout.share,
            "action": action,
            "watch": result,
        },
    )


def _neg_log10(value: Any) -> float:
    if value is None:
        return 0.0
    return -math.log10(max(float(value), 1e-300))


class RolloutWatcher:
    """Consumes closed windows and decides watching rollouts. ``start()`` / ``stop()``."""

    def __init__(self, settings: Settings, engine: Engine, policy: RetrainPolicy) -> None:
        self.settings, self.engine, self.policy = settings, engine, policy
        self.windows_topic = settings.topic("windows")
        self.findings_topic = settings.topic("findings")
        self.group_id = f"{settings.worker.app_id}-rollout"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._rollouts: dict[str, Rollout] = {}
        self._read_at = -1e9
        #: model -> its latest closed tumbling windows (bounded both ways).
        self._recent: collections.OrderedDict[str, collections.deque[dict[str, Any]]] = (
            collections.OrderedDict()
        )

    # -- life -------------------------------------------------------------------------------
    def start(self) -> None:
        kafka = self.settings.kafka
        client_id = f"{self.group_id}-watcher"
        with kafka_config.auth_failures_explained(kafka):
            self._producer = KafkaProducer(
                **kafka_config.client_config(kafka, producer=True, client_id=client_id)
            )
        try:
            self._consumer = KafkaConsumer(
                self.windows_topic,
                **kafka_config.client_config(kafka),
                group_id=self.group_id,
                client_id=f"{self.group_id}-watcher",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
        except BaseException:
            self._producer.close(timeout=5)
            self._producer = None
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._consume, name="rollout-watcher", daemon=True)
        self._thread.start()
        log.info("rollout watcher: %s as %s", self.windows_topic, self.group_id)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None

    # -- the consumer -----------------------------------------------------------------------
    def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                try:
                    batches = consumer.poll(timeout_ms=500, max_records=200)
                except KafkaError as exc:
                    log.warning("rollout watcher: polling failed (%s); trying again", exc)
                    self._stop.wait(RETRY_PAUSE_S)
                    continue
                for partition, records in batches.items():
                    for record in records:
                        if self._stop.is_set() or not self._take(consumer, partition, record):
                            break
        except Exception:
            log.exception("the rollout watcher stopped")
            raise
        finally:
            consumer.close(autocommit=False)
            self._consumer = None

    def _take(self, consumer: KafkaConsumer, partition: TopicPartition, record: Any) -> bool:
        """Handle one window and commit it; ``False``: it failed and will come again."""
        try:
            self.handle(record.value)
            consumer.commit({partition: OffsetAndMetadata(record.offset + 1, "", -1)})
        except (SQLAlchemyError, GenmonError, KafkaError) as exc:
            log.warning(
                "rollout watcher: window %s[%d]@%d failed (%s); trying again in %g s",
                partition.topic,
                partition.partition,
                record.offset,
                exc,
                RETRY_PAUSE_S,
            )
            self._read_at = -1e9  # read the rollouts again: one may have ended meanwhile
            consumer.seek(partition, record.offset)
            self._stop.wait(RETRY_PAUSE_S)
            return False
        return True

    def _watching(self, model_id: str) -> Rollout | None:
        now = time.monotonic()
        if now - self._read_at >= ROLLOUTS_TTL_S:
            self._rollouts = {r.model_id: r for r in active_rollouts(self.engine)}
            self._read_at = now
        return self._rollouts.get(model_id)

    def handle(self, raw: bytes | None) -> WatchResult | None:
        """Apply one closed window record; the watch's result when a rollout watched it."""
        try:
            record = json.loads(raw or b"")
        except ValueError:
            log.warning("rollout watcher: skipped a windows message that is not JSON")
            return None
        if not isinstance(record, dict) or record.get("kind") != "tumbling":
            return None
        model_id = str(record.get("model_id"))
        rollout = self._watching(model_id)
        if rollout is None or not _closed_after_start(record, rollout):
            self._remember(model_id, record)
            return None
        watch = _watch_of(rollout, self.policy)
        forecast = self._forecast(rollout, watch)
        planned_before = (rollout.result or {}).get("planned_watch_s")
        decided_before = (rollout.result or {}).get("decision")
        result = watch.update(record)
        saved = result.to_json()
        if forecast is not None or "forecast_watch_s" in (rollout.result or {}):
            saved["forecast_watch_s"] = (rollout.result or {}).get("forecast_watch_s", forecast)
        if result.decision == "regressed":
            saved["decided_end_ms"] = (rollout.result or {}).get("decided_end_ms") or int(
                record["end_ms"]
            )
        saved["alpha"] = watch.alpha
        planned = result.planned_watch_s
        if planned is None:
            planned = saved.get("forecast_watch_s")
        save_watch(
            self.engine, rollout.rollout_id, watch.to_state(), saved, result.watch_from_ms, planned
        )
        rollout.state, rollout.result = watch.to_state(), saved
        rollout.watch_from_ms, rollout.planned_watch_s = result.watch_from_ms, planned
        if result.planned_watch_s is not None and planned_before is None:
            log.info(
                "rollout of %s %s: planned from its own traffic: %s",
                rollout.model_id,
                rollout.challenger,
                watch_minutes_text(result.planned_watch_s),
            )
        if result.decision != decided_before:
            self._act(rollout, result, saved)
        return result

    def _remember(self, model_id: str, record: dict[str, Any]) -> None:
        """Keep the counts of ``record`` (not its exemplars or sketches: a few hundred bytes
        a window) for the forecast of a rollout that may start later."""
        recent = self._recent.pop(model_id, None)
        if recent is None:
            recent = collections.deque(maxlen=RECENT_WINDOWS)
        recent.append(
            {
                "kind": record.get("kind"),
                "start_ms": record.get("start_ms"),
                "end_ms": record.get("end_ms"),
                "series": [
                    {key: series.get(key) for key in _COUNTS if key in series}
                    for series in record.get("series") or ()
                    if isinstance(series, dict)
                ],
            }
        )
        self._recent[model_id] = recent
        while len(self._recent) > RECENT_MODELS:
            self._recent.popitem(last=False)

    def _forecast(self, rollout: Rollout, watch: RolloutWatch) -> float | None:
        """At a rollout's first window: its watch's length at the traffic of the windows
        before it (logged: "watch about 40 minutes at current traffic")."""
        if rollout.state:
            return None
        recent = self._recent.pop(rollout.model_id, None)
        forecast = watch.forecast(recent) if recent else None
        log.info(
            "rollout of %s %s on %.0f%% of traffic: %s",
            rollout.model_id,
            rollout.challenger,
            rollout.share * 100,
            watch_minutes_text(forecast)
            if forecast is not None and math.isfinite(forecast)
            else "the watch's length is planned from its first windows",
        )
        return forecast if forecast is not None and math.isfinite(forecast) else None

    # -- verdicts ---------------------------------------------------------------------------
    def _act(self, rollout: Rollout, result: WatchResult, saved: dict[str, Any]) -> None:
        if result.decision == "regressed":
            self._regressed(rollout, saved)
        elif result.decision == "clean":
            log.info(
                "rollout of %s %s: confirmed (%s)",
                rollout.model_id,
                rollout.challenger,
                result.title,
            )
            self._announce(
                confirm_rollout(
                    self.engine,
                    rollout.rollout_id,
                    saved,
                    actor="rollout-watch",
                    reason=result.title,
                )
            )
            self._forget(rollout)
        elif result.decision == "inconclusive":
            log.warning(
                "rollout of %s %s: inconclusive, withdrawn (%s)",
                rollout.model_id,
                rollout.challenger,
                result.title,
            )
            events = end_rollout(
                self.engine,
                rollout.rollout_id,
                RolloutStatus.INCONCLUSIVE,
                saved,
                result.title,
                "rollout-watch",
            )
            self._announce(events)
            self._forget(rollout)

    def _regressed(self, rollout: Rollout, saved: dict[str, Any]) -> None:
        on_regression = self.policy.for_model(rollout.model_id).rollout.on_regression
        action = (
            f"rolled back to {rollout.champion}"
            if on_regression == "rollback"
            else f"challenger {rollout.challenger} still on {rollout.share:.0%} of traffic: "
            f"`genmon models rollback {rollout.model_id}` to stop it"
        )
        finding = regression_finding(rollout, saved, action)
        self._publish(finding)
        log.warning("rollout of %s %s: %s", rollout.model_id, rollout.challenger, finding.title)
        if on_regression != "rollback":
            return
        events = rollback_rollout(
            self.engine,
            rollout.rollout_id,
            saved,
            reason=str(finding.title),
            actor="rollout-watch",
            finding_id=finding.finding_id,
        )
        self._announce(events)
        self._forget(rollout)

    def _forget(self, rollout: Rollout) -> None:
        self._rollouts.pop(rollout.model_id, None)

    def _publish(self, finding: Finding) -> None:
        producer = self._producer
        assert producer is not None, "start() the watcher first"
        future = producer.send(
            self.findings_topic, key=finding.model_id.encode(), value=encode(finding)
        )
        producer.flush(PUBLISH_TIMEOUT_S)
        future.get(timeout=PUBLISH_TIMEOUT_S)

    def _announce(self, events: list[Any]) -> None:
        """Publish alias moves; a failure is logged (``genmon models announce`` repeats)."""
        if not events:
            return
        from genmon.retrain.announce import ModelAnnouncer

        with ModelAnnouncer(self.settings) as announcer:
            try:
                report = announcer.announce(events)
            except Exception as exc:  # the alias moved regardless
                log.warning("announcing %s failed: %s", events[0].model_id, exc)
                return
            for failure in report.failures:
                log.warning("announcing %s: %s", events[0].model_id, failure)


__all__ = ["DETECTOR", "RolloutWatcher", "new_watch", "regression_finding"]
