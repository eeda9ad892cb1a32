"""The embedding stage: sample texts, encode them off the hot path, feed embedding drift.

Flow (``<prefix>`` is ``kafka.topic_prefix``)::

    ingest sink ──► Sampler ──(slot ended)──► <prefix>.embed-requests ──► encoder agent
    (in memory,     Bernoulli(rate) + one     one text per message,      take(batch_size,
     no I/O)        reservoir per model,      keyed by model id          within=...) ->
                    version, field, slot                                 TextEncoder ->
                    (flush_interval_s)                                   submit_embeddings

* **Sampling.** Each sampled text of a valid inference goes to a bounded reservoir per
  model, version, field and slot of ``embedding.flush_interval_s`` event seconds
  (:mod:`genmon.streams.embedding.sampling`). When a slot ends (checked every
  ``windows.close_interval_s``) its reservoirs are written to the request topic, one
  message per text, each carrying the sub-sample's id, index and size: texts reach the
  drift test seconds after they were sampled, not when the 60 s window closes.
* **Encoding.** The encoder agent takes batches from the request topic, encodes them in a
  dedicated thread (the event loop, and with it ingest and aggregates, never waits for
  the model), reassembles each sub-sample and hands its embeddings and texts to the
  detectors through the pipeline's hook
  (:meth:`genmon.streams.pipeline.Pipeline.submit_embeddings`). A sub-sample missing
  texts after ``embedding.group_timeout_s`` is submitted as it is; one seen again after a
  redelivery is skipped (:class:`~genmon.streams.embedding.sampling.SampleAssembler`).
  Each sub-sample is one look of the series' drift test; see
  :mod:`genmon.streams.detection.runner`.
* **Backpressure.** Every ``embedding.backlog_check_interval_s`` the sampler reads the
  encoder's backlog: messages on the request topic beyond its consumer group's committed
  offsets, and sets the sample rate from it (AIMD,
  :class:`~genmon.streams.embedding.sampling.RateController`).

**Where the encoder runs.** With ``embedding.run_encoder`` (default) the encoder agent
runs inside ``genmon worker``. To give the model its own process (or machine, or GPU)
set ``GENMON_EMBEDDING__RUN_ENCODER=false`` for the workers and run
``genmon worker --role embed --web-port 6067``: a Faust app with id
``<worker.app_id>-embed`` that consumes only the request topic, keeps the embedding
detectors' state in its own table and publishes findings to ``<prefix>.findings``.

Metrics (on the worker's ``/metrics`` and ``/stats``): ``genmon_embedding_sample_rate``,
``genmon_embedding_backlog``, ``genmon_embedding_backlog_errors_total``,
``genmon_embedding_texts_queued_total``,
``genmon_embedding_dropped_total{reason=rate|reservoir|future}``,
``genmon_embedding_encoded_total``, ``genmon_embedding_sentences_per_second``,
``genmon_embedding_encode_seconds``, ``genmon_embedding_samples_submitted_total{complete}``,
``genmon_embedding_submit_errors_total``, ``genmon_embedding_bad_requests_total``,
``genmon_embedding_encoder_info{backend,device}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from genmon import kafka_config
from genmon.exceptions import ConfigurationError, GenmonError
from genmon.logs import install_on_worker
from genmon.schemas.events import InferenceEvent
from genmon.settings import KafkaSettings, Settings
from genmon.streams.embedding.sampling import (
    EmbedRequest,
    RateController,
    SampleAssembler,
    Sampler,
    SubSample,
)

if TYPE_CHECKING:
    from faust.types import TopicT

    from genmon.streams.app import GenmonApp
    from genmon.streams.embedding.encoder import TextEncoder

log = logging.getLogger(__name__)

#: Kind of the internal topic: ``<prefix>.embed-requests``.
REQUESTS_KIND = "embed-requests"

#: The detectors' hook: (model, version, field, sub-sample end, embeddings, texts).
Submit = Callable[[str, str, str, datetime, np.ndarray, Sequence[str]], Awaitable[Any]]
T = TypeVar("T")


# -- backlog -----------------------------------------------------------------------------------
class BacklogProbe:
    """Messages on the request topic beyond the encoder group's committed offsets (blocking).

    Reads offsets only: its client never joins the group or commits. ``kafka`` gives the
    security options (TLS, SASL); the default is a plain-text connection.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.bootstrap_servers, self.topic, self.group_id = bootstrap_servers, topic, group_id
        self.kafka = kafka or KafkaSettings(bootstrap_servers=bootstrap_servers)
        self._client: Any = None

    def read(self) -> int:
        from kafka import KafkaConsumer, TopicPartition

        if self._client is None:
            self._client = KafkaConsumer(
                **kafka_config.client_config(self.kafka, self.bootstrap_servers),
                group_id=self.group_id,
                enable_auto_commit=False,
            )
        client = self._client
        partitions = client.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        if not tps:
            return 0
        ends, starts = client.end_offsets(tps), client.beginning_offsets(tps)
        backlog = 0
        for tp in tps:
            # Nothing committed yet: the encoder starts from the earliest offset.
            done = client.committed(tp)
            backlog += max(ends[tp] - (starts[tp] if done is None else done), 0)
        return backlog

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# -- metrics -----------------------------------------------------------------------------------
class EmbeddingMetrics:
    """The embedding stage's signals, on the worker's Prometheus registry."""

    def __init__(self, registry: Any) -> None:
        r = registry
        self.sample_rate = Gauge(
            "genmon_embedding_sample_rate", "Share of texts the sampler keeps now", registry=r
        )
        self.backlog = Gauge(
            "genmon_embedding_backlog",
            "Texts on the request topic the encoder has not committed yet",
            registry=r,
        )
        self.backlog_errors = Counter(
            "genmon_embedding_backlog_errors",
            "Backlog reads that failed (the sample rate stayed as it was)",
            registry=r,
        )
        self.queued = Counter(
            "genmon_embedding_texts_queued", "Sampled texts written for encoding", registry=r
        )
        self.dropped = Counter(
            "genmon_embedding_dropped",
            "Texts left out of the samples, by reason (rate, reservoir, future)",
            ["reason"],
            registry=r,
        )
        self.encoded = Counter("genmon_embedding_encoded", "Texts encoded", registry=r)
        self.sentences_per_second = Gauge(
            "genmon_embedding_sentences_per_second",
            "Encoder throughput over its last batch",
            registry=r,
        )
        self.encode_seconds = Histogram(
            "genmon_embedding_encode_seconds",
            "Time to encode one batch",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.submitted = Counter(
            "genmon_embedding_samples_submitted",
            "Sub-samples handed to the embedding drift detector",
            ["complete"],
            registry=r,
        )
        self.submit_errors = Counter(
            "genmon_embedding_submit_errors",
            "Sub-samples the drift detector hook raised on",
            registry=r,
        )
        self.bad_requests = Counter(
            "genmon_embedding_bad_requests",
            "Undecodable messages on the request topic (skipped)",
            registry=r,
        )
        self.encoder_info = Gauge(
            "genmon_embedding_encoder_info",
            "The encoder in use (value 1)",
            ["backend", "device"],
            registry=r,
        )
        self._dropped_seen: Tally[str] = Tally()
        self._queued_seen = 0

    def sync_sampler(self, sampler: Sampler) -> None:
        """Carry the sampler's counters over (they only grow)."""
        for reason, total in sampler.dropped.items():
            delta = total - self._dropped_seen[reason]
            if delta:
                self.dropped.labels(reason).inc(delta)
                self._dropped_seen[reason] = total
        if sampler.queued > self._queued_seen:
            self.queued.inc(sampler.queued - self._queued_seen)
            self._queued_seen = sampler.queued
        self.sample_rate.set(sampler.rate)


# -- Faust wiring ------------------------------------------------------------------------------
def requests_topic(app: GenmonApp, settings: Settings) -> TopicT:
    """The internal ``<prefix>.embed-requests`` topic, keyed by model id."""
    return app.topic(
        settings.topic(REQUESTS_KIND),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.kafka.partitions,
        retention=settings.kafka.retention_ms / 1000.0,
        internal=True,
    )


def embed_app_id(settings: Settings) -> str:
    """App id (and consumer group) of ``genmon worker --role embed``."""
    return f"{settings.worker.app_id}-embed"


def encoder_group_id(settings: Settings) -> str:
    """Consumer group of whoever runs the encoder agent (the app id of its worker)."""
    return settings.worker.app_id if settings.embedding.run_encoder else embed_app_id(settings)


class SamplerStage:
    """The sampler in a worker: ingest sink, slot-ending timer, backlog control."""

    def __init__(self, app: GenmonApp, settings: Settings, metrics: EmbeddingMetrics) -> None:
        embedding = settings.embedding
        self.settings = settings
        self.metrics = metrics
        self.topic = requests_topic(app, settings)
        self.sampler = Sampler(settings)
        self.control = RateController(
            max_rate=embedding.sample_rate,
            min_rate=embedding.min_sample_rate,
            max_backlog=embedding.max_backlog,
            caught_up=embedding.batch_size,
        )
        self.probe = BacklogProbe(
            settings.kafka.bootstrap_servers,
            self.topic.get_topic_name(),
            encoder_group_id(settings),
            settings.kafka,
        )
        self._declared = False
        metrics.sync_sampler(self.sampler)

    async def on_inferences(self, events: list[InferenceEvent]) -> None:
        self.sampler.offer(events, time.time())

    async def flush(self) -> int:
        """Write the requests of ended slots; return how many."""
        requests = self.sampler.due(time.time())
        if requests and not self._declared:
            await self.topic.maybe_declare()
            self._declared = True
        for i, request in enumerate(requests):
            # Only enqueued in the producer's buffer: nothing here waits for the broker.
            await self.topic.send(key=request.model_id.encode(), value=request.to_bytes())
            if i % 100 == 99:
                await asyncio.sleep(0)  # a big flush must not hold up the ingest agents
        self.metrics.sync_sampler(self.sampler)
        return len(requests)

    async def check_backlog(self) -> None:
        try:
            backlog = await asyncio.to_thread(self.probe.read)
        except Exception as exc:
            self.metrics.backlog_errors.inc()
            log.warning("could not read the encoder backlog (%r); sample rate unchanged", exc)
            self.probe.close()
            return
        self.sampler.rate = self.control.observe(backlog)
        self.metrics.backlog.set(backlog)
        self.metrics.sync_sampler(self.sampler)


class EncoderStage:
    """The encoder agent's work: decode, encode in a thread, reassemble, submit."""

    def __init__(
        self,
        settings: Settings,
        metrics: EmbeddingMetrics,
        submit: Submit,
        encoder_factory: Callable[[], TextEncoder] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.submit = submit
        self.assembler = SampleAssembler(settings.embedding.group_timeout_s)
        self._factory = encoder_factory or self._default_factory
        self._encoder: TextEncoder | None = None
        # One thread: encodes run one at a time and never on the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="genmon-encoder")

    def _default_factory(self) -> TextEncoder:
        from genmon.streams.embedding.encoder import shared_encoder

        return shared_encoder(self.settings.embedding)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encoder(self) -> TextEncoder:
        if self._encoder is None:
            encoder = await self._run(self._factory)
            self.metrics.encoder_info.labels(encoder.backend, encoder.device).set(1)
            log.info(
                "embedding encoder ready: backend=%s device=%s agreement=%s",
                encoder.backend,
                encoder.device,
                encoder.agreement,
            )
            self._encoder = encoder
        return self._encoder

    async def handle(self, values: Sequence[bytes | None]) -> None:
        requests: list[EmbedRequest] = []
        for value in values:
            try:
                requests.append(EmbedRequest.from_bytes(value))
            except ValueError as exc:
                self.metrics.bad_requests.inc()
                log.warning("skipping a message on the embedding request topic: %s", exc)
        if requests:
            encoder = await self.encoder()
            started = time.perf_counter()
            vectors = await self._run(encoder.encode, [r.text for r in requests])
            took = time.perf_counter() - started
            self.metrics.encoded.inc(len(requests))
            self.metrics.encode_seconds.observe(took)
            self.metrics.sentences_per_second.set(len(requests) / max(took, 1e-9))
            for sample in self.assembler.add(requests, vectors, time.monotonic()):
                await self._submit(sample)
        await self.submit_expired()

    async def submit_expired(self) -> None:
        for sample in self.assembler.expired(time.monotonic()):
            await self._submit(sample)

    async def _submit(self, sample: SubSample) -> None:
        try:
            await self.submit(
                sample.model_id,
                sample.model_version,
                sample.field,
                sample.end,
                sample.embeddings,
                sample.texts,
            )
        except GenmonError as exc:
            # Refusals with a reason (e.g. a state over the size bound): no traceback.
            self.metrics.submit_errors.inc()
            log.warning(
                "embedding drift detector refused %d %s embeddings of %s/%s: %s",
                len(sample.embeddings),
                sample.field,
                sample.model_id,
                sample.model_version,
                exc,
            )
            return
        except Exception:
            self.metrics.submit_errors.inc()
            log.exception(
                "embedding drift hook failed on %d %s embeddings of %s/%s",
                len(sample.embeddings),
                sample.field,
                sample.model_id,
                sample.model_version,
            )
            return
        self.metrics.submitted.labels(str(sample.complete).lower()).inc()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def install(app: GenmonApp) -> None:
    """Installer for :data:`genmon.streams.app.DEFAULT_INSTALLERS` (after the pipeline)."""
    settings = app.genmon.settings
    if not settings.embedding.enabled:
        return
    metrics = EmbeddingMetrics(app.genmon.metrics.registry)
    install_sampler(app, settings, metrics)
    if settings.embedding.run_encoder:

        async def submit(*args: Any) -> Any:
            return await app.genmon.extras["pipeline"].submit_embeddings(*args)

        install_encoder(app, settings, metrics, submit)


def install_sampler(app: GenmonApp, settings: Settings, metrics: EmbeddingMetrics) -> SamplerStage:
    stage = SamplerStage(app, settings, metrics)
    app.genmon.extras["embedding_sampler"] = stage
    app.genmon.sinks.add_inference_sink(stage.on_inferences, name="embedding.sampler")

    @app.timer(interval=settings.windows.close_interval_s, name="genmon.embedding.flush")
    async def flush_samples() -> None:
        try:
            await stage.flush()
        except Exception:
            log.exception("could not write embedding requests")

    @app.timer(
        interval=settings.embedding.backlog_check_interval_s, name="genmon.embedding.backlog"
    )
    async def check_backlog() -> None:
        await stage.check_backlog()

    return stage


def install_encoder(
    app: GenmonApp, settings: Settings, metrics: EmbeddingMetrics, submit: Submit
) -> EncoderStage:
    stage = EncoderStage(settings, metrics, submit)
    app.genmon.extras["embedding_encoder"] = stage
    topic = requests_topic(app, settings)
    size, within = settings.embedding.batch_size, settings.embedding.batch_within_s

    async def encode_requests(stream: Any) -> None:
        await stage.encoder()  # load (and export, the first time) before taking messages
        async for values in stream.take(size, within=within):
            try:
                await stage.handle(values)
            except Exception:
                # Acknowledge anyway: a batch that crashed the encoder would crash it again.
                log.exception("encoding a batch of %d embedding requests failed", len(values))

    app.agent(topic, name="genmon.embedding.encoder")(encode_requests)

    @app.timer(interval=settings.windows.close_interval_s, name="genmon.embedding.expire")
    async def submit_expired() -> None:
        await stage.submit_expired()

    return stage


def install_embed_role(app: GenmonApp) -> None:
    """Installer of ``genmon worker --role embed``: only the encoder, with its own detectors."""
    from genmon.streams.pipeline import Pipeline

    settings = app.genmon.settings
    metrics = EmbeddingMetrics(app.genmon.metrics.registry)
    # Only the pipeline's tables and hook are used here: no sinks, timers or agents of its own.
    pipeline = Pipeline(app, settings)
    app.genmon.extras["pipeline"] = pipeline
    install_encoder(app, settings, metrics, pipeline.submit_embeddings)


def embed_role_settings(settings: Settings) -> Settings:
    """The settings of an ``--role embed`` worker: its own app id (consumer group)."""
    worker = settings.worker.model_copy(update={"app_id": embed_app_id(settings)})
    return settings.model_copy(update={"worker": worker})


def run_embed_worker(settings: Settings, *, loglevel: str | None = None) -> None:
    """``genmon worker --role embed``: run only the encoder agent until a signal stops it."""
    import faust

    from genmon.infra.kafka import KafkaBroker
    from genmon.streams.app import create_app

    if settings.embedding.run_encoder:
        # Both would consume the request topic (in different groups): every sample twice.
        raise ConfigurationError(
            "genmon worker --role embed needs embedding.run_encoder=false, for this worker "
            "and the main workers alike: set GENMON_EMBEDDING__RUN_ENCODER=false"
        )
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    app = create_app(embed_role_settings(settings), installers=(install_embed_role,))
    worker = faust.Worker(app, loglevel=loglevel or settings.worker.loglevel)
    install_on_worker(worker, settings)
    worker.execute_from_commandline()
