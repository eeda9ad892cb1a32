"""The retrain agent: turns incidents and requests into job rows, and never trains.

It runs inside ``genmon worker --role retrain`` (:mod:`genmon.retrain.runner`), beside the
job loop, with two threads:

- a **consumer** (kafka-python, group ``<worker.app_id>-retrain``, offsets committed by
  hand) of ``<prefix>.incidents`` and ``<prefix>.retrain``. An incident event that may
  start a job (opened, updated, escalated, reopened) is decided
  (:func:`~genmon.retrain.triggers.decide_incident`); a request is published to the
  retrain topic (key: the model id) and acknowledged by the broker *before* the incident's
  offset is committed, so a crash in between publishes it again (the same job id, stored
  once). A retrain request is stored (:func:`~genmon.retrain.triggers.store_request`) and
  its offset committed at once. Nothing here waits on training: a job longer than
  ``max.poll.interval.ms`` inside a poll loop would be redelivered forever; the job loop
  claims the stored row instead.
- a **checker**, every ``retrain.volume_check_interval_s``: open incidents whose decision
  may change with time (more firings, a cool-down over, corrections arrived) are decided
  again, and registered models are checked for the data-volume trigger.

A message that fails on the database or the broker is not committed: the consumer seeks
back to it and tries again after a pause. A message that is not a valid event is logged
and skipped (it can never become one).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from genmon import kafka_config
from genmon.db import session_scope
from genmon.exceptions import GenmonError, SchemaError
from genmon.retrain.policy import RetrainPolicy
from genmon.retrain.triggers import (
    DECIDING_TRANSITIONS,
    decide_incident,
    decide_volume,
    open_undecided,
    store_request,
)
from genmon.schemas.codec import decode, encode
from genmon.schemas.events import IncidentEvent, RetrainRequest, utcnow
from genmon.schemas.retrain import RegisteredModel
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: Pause before a message that failed is tried again.
RETRY_PAUSE_S = 2.0
#: How long a publish may wait for the broker's acknowledgement.
PUBLISH_TIMEOUT_S = 30.0


class RetrainAgent:
    """Consumes incidents and retrain requests; stores jobs. ``start()`` / ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        policy: RetrainPolicy,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings, self.engine, self.policy, self.clock = settings, engine, policy, clock
        self.incidents_topic = settings.topic("incidents")
        self.retrain_topic = settings.topic("retrain")
        self.group_id = f"{settings.worker.app_id}-retrain"
        self.interval_s = settings.retrain.volume_check_interval_s
        #: What the agent did, by kind (``published``, ``stored``, ``skipped``, ``retried``).
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None

    # -- life -------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the broker and start the consumer and checker threads."""
        kafka = self.settings.kafka
        client_id = f"{self.group_id}-agent"
        with kafka_config.auth_failures_explained(kafka):
            self._producer = KafkaProducer(
                **kafka_config.client_config(kafka, producer=True, client_id=client_id)
            )
        try:
            self._consumer = KafkaConsumer(
                self.incidents_topic,
                self.retrain_topic,
                **kafka_config.client_config(kafka),
                group_id=self.group_id,
                client_id=f"{self.group_id}-agent",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
        except BaseException:
            self._producer.close(timeout=5)
            self._producer = None
            raise
        self._stop.clear()
        for name, target in (("consumer", self._consume), ("checker", self._check)):
            thread = threading.Thread(target=target, name=f"retrain-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "retrain agent: %s and %s as %s",
            self.incidents_topic,
            self.retrain_topic,
            self.group_id,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop both threads (the current message finishes first) and close the clients."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None

    def __enter__(self) -> RetrainAgent:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # -- the consumer -----------------------------------------------------------------------
    def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                try:
                    batches = consumer.poll(timeout_ms=500, max_records=100)
                except KafkaError as exc:
                    log.warning("retrain agent: polling failed (%s); trying again", exc)
                    self._stop.wait(RETRY_PAUSE_S)
                    continue
                for partition, records in batches.items():
                    for record in records:
                        if self._stop.is_set() or not self._take(consumer, partition, record):
                            break
        except Exception:
            log.exception("the retrain agent's consumer stopped")
            raise
        finally:
            consumer.close(autocommit=False)
            self._consumer = None

    def _take(self, consumer: KafkaConsumer, partition: TopicPartition, record: Any) -> bool:
        """Handle one record and commit it; ``False``: it failed and will come again."""
        try:
            self.handle(partition.topic, record.value)
            consumer.commit({partition: OffsetAndMetadata(record.offset + 1, "", -1)})
        except (SQLAlchemyError, GenmonError, KafkaError) as exc:
            log.warning(
                "retrain agent: %s[%d]@%d failed (%s); trying again in %g s",
                partition.topic,
                partition.partition,
                record.offset,
                exc,
                RETRY_PAUSE_S,
            )
            self.counts["retried"] += 1
            consumer.seek(partition, record.offset)
            self._stop.wait(RETRY_PAUSE_S)
            return False
        return True

    def handle(self, topic: str, raw: bytes | None) -> None:
        """Act on one message of the incidents or the retrain topic."""
        try:
            if topic == self.retrain_topic:
                request = decode(raw, RetrainRequest)
            else:
                event = decode(raw, IncidentEvent)
        except SchemaError as exc:
            log.warning("retrain agent: skipped a message of %s that is no event: %s", topic, exc)
            self.counts["skipped"] += 1
            return
        if topic == self.retrain_topic:
            decision = store_request(self.engine, self.policy, request, clock=self.clock)
            log.info("retrain %s: %s (%s)", decision.trigger_key, decision.outcome, decision.reason)
            self.counts["stored"] += 1
        elif event.transition in DECIDING_TRANSITIONS:
            asked = decide_incident(self.engine, self.policy, event.incident_id, clock=self.clock)
            if asked is not None:
                self.publish(asked)

    def publish(self, request: RetrainRequest) -> None:
        """Send ``request`` to the retrain topic and wait for the broker to have it."""
        producer = self._producer
        assert producer is not None, "start() the agent first"
        future = producer.send(
            self.retrain_topic, key=request.model_id.encode(), value=encode(request)
        )
        producer.flush(PUBLISH_TIMEOUT_S)
        future.get(timeout=PUBLISH_TIMEOUT_S)
        self.counts["published"] += 1

    # -- the checker ------------------------------------------------------------------------
    def _check(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except (SQLAlchemyError, GenmonError, KafkaError) as exc:
                log.warning("retrain agent: a periodic check failed (%s); again later", exc)
            self._stop.wait(self.interval_s)

    def check_once(self) -> int:
        """Decide waiting incidents again and check data volume; the requests published."""
        asked: list[RetrainRequest] = []
        for incident_id in open_undecided(self.engine):
            found = decide_incident(self.engine, self.policy, incident_id, clock=self.clock)
            asked += [found] if found is not None else []
        with session_scope(self.engine) as session:
            models = session.exec(select(RegisteredModel.model_id)).all()
        for model_id in models:
            found = decide_volume(self.engine, self.policy, model_id, clock=self.clock)
            asked += [found] if found is not None else []
        for request in asked:
            if self._stop.is_set():
                break
            self.publish(request)
        return len(asked)
