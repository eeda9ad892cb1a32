"""The producer SDK: log inferences and feedback to Kafka without slowing the caller.

>>> from genmon import Monitor
>>> with Monitor("127.0.0.1:1", buffer_max_events=10) as monitor:  # doctest: +SKIP
...     monitor.log_inference(model_id="chat", prompt="hi", response="hello", latency_ms=120)
True

How it behaves:

* ``log_inference``/``log_feedback`` validate the event with pydantic in the caller's
  thread, serialize it, and put it on a bounded in-memory buffer. They never wait
  for the network and never raise because of the broker.
* Invalid input (a missing ``model_id``, a latency that is not a number, ...) is a
  programming error: by default it raises :class:`genmon.exceptions.SchemaError`
  whose ``reason`` is one of :data:`genmon.schemas.codec.REASONS`.
  ``Monitor(on_invalid="count")`` instead counts it in ``stats.invalid``, logs it
  (rate-limited) and returns ``False``. Prompts, responses and chat message texts longer
  than ``max_text_chars`` are cut to that length (``stats.truncated``), not rejected.
* A background thread moves the buffer into a kafka-python ``KafkaProducer``
  (``acks=all`` unless ``kafka.acks`` says otherwise, idempotent so retries cannot
  reorder, gzip by default). When the broker is down the thread keeps retrying, with
  backoff, to construct the producer and to send; events wait in the buffer meanwhile.
* TLS and SASL come from ``settings.kafka`` (:mod:`genmon.kafka_config`). A broker that
  refuses the login (a wrong password) or the certificate is logged as an ERROR naming
  the broker and the mechanism, after the first connect attempt (5 s) and then at most
  every few seconds, instead of the warning of an outage; a CA or certificate file that
  cannot be read raises :class:`ConfigurationError` at construction.
* ``buffer_max_events`` bounds every event accepted but not yet acknowledged by the
  broker. Beyond it new events are dropped, counted in ``stats.dropped`` and
  logged at most every few seconds.
* Call :meth:`Monitor.close` (or use ``with``) to deliver what is buffered; a monitor
  still open when the interpreter exits gets a few seconds to do so.
* Events are keyed by ``model_id``, so one model's events stay in order on one
  partition. Each carries the headers ``genmon-producer`` (a uuid per Monitor) and
  ``genmon-seq`` (0, 1, 2, ... per topic and model, also for dropped events), so the
  worker can count lost and reordered events.
* The counters behind ``genmon-seq`` are an LRU of ``sdk.sequence_max_models``
  ``(topic, model)`` pairs. A pair pushed out and seen again counts from 0 under the
  producer id ``<uuid>.<n>`` (``n``: evictions so far), which the worker tracks as a new
  sequence, so eviction invents neither gaps nor reorders; events lost just before the
  restart go unnoticed.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, TypeVar, overload

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from pydantic import BaseModel, ValidationError

from genmon import kafka_config
from genmon.chat import chat_fields
from genmon.exceptions import ConfigurationError, SchemaError
from genmon.follow import ROLLOUT, ModelFollower, OnChange, RolloutFollower, followed_fields
from genmon.schemas.codec import HEADER_PRODUCER, HEADER_SEQ, classify, encode
from genmon.schemas.events import FeedbackEvent, InferenceEvent, ModelAlias
from genmon.sequences import Sequences
from genmon.settings import Settings, get_settings

__all__ = ["Monitor", "MonitorStats"]

log = logging.getLogger(__name__)

COMPRESSIONS: Final = ("gzip", "snappy", "lz4", "zstd", "none")
_BACKOFF_INITIAL_S: Final = 0.2
_BACKOFF_MAX_S: Final = 5.0
_LOG_EVERY_S: Final = 10.0
#: Longest one attempt to reach the broker may block the background thread.
_CONNECT_TIMEOUT_MS: Final = 5000
_SEND_BATCH: Final = 500

E = TypeVar("E", InferenceEvent, FeedbackEvent)


@dataclass(frozen=True)
class MonitorStats:
    """Counters of one :class:`Monitor` since it was created."""

    sent: int
    """Events the broker acknowledged."""
    buffered: int
    """Events accepted and not yet acknowledged (in the buffer or in flight)."""
    dropped: int
    """Events lost because the buffer was full, or still unsent when ``close`` gave up."""
    invalid: int
    """Events rejected by validation."""
    failed: int
    """Events the producer gave up on (delivery timeout, message too large, ...)."""
    truncated: int
    """Events whose texts were cut to ``max_text_chars``."""


@dataclass(frozen=True)
class _Record:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class _RateLimitedLog:
    """Logs a recurring problem at most once per interval, with how often it happened."""

    def __init__(self, interval_s: float = _LOG_EVERY_S) -> None:
        self._interval_s = interval_s
        self._last = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        suffix = f" ({suppressed} more since the last report)" if suppressed else ""
        log.log(level, message + suffix, *args)


class Monitor:
    """Publishes inference and feedback events to genmon's Kafka topics.

    Args:
        bootstrap_servers: ``host:port[,host:port]``; defaults to ``settings.kafka``.
        settings: genmon settings; defaults to :func:`genmon.settings.get_settings`.
        buffer_max_events: events kept while not yet acknowledged (``settings.sdk``).
        linger_ms: how long the producer waits to fill a batch (``settings.sdk``).
        compression: gzip, snappy, lz4, zstd or none (``settings.sdk``).
        client_id: Kafka client id; defaults to ``genmon-sdk-<producer id>``.
        on_invalid: ``"raise"`` a :class:`SchemaError` or ``"count"`` invalid events.
        delivery_timeout_ms: how long the producer retries one event once it holds it.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: Settings | None = None,
        buffer_max_events: int | None = None,
        linger_ms: int | None = None,
        compression: str | None = None,
        client_id: str | None = None,
        on_invalid: Literal["raise", "count"] = "raise",
        delivery_timeout_ms: int | None = None,
    ) -> None:
        self._settings = settings or get_settings()
        sdk = self._settings.sdk
        self._buffer_max = sdk.buffer_max_events if buffer_max_events is None else buffer_max_events
        compression = sdk.compression if compression is None else compression
        if self._buffer_max < 1:
            raise ConfigurationError(f"buffer_max_events must be >= 1, got {self._buffer_max}")
        if compression not in COMPRESSIONS:
            raise ConfigurationError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
            )
        if on_invalid not in ("raise", "count"):
            raise ConfigurationError(f"on_invalid must be 'raise' or 'count', got {on_invalid!r}")
        self._on_invalid = on_invalid
        self._max_text_chars = sdk.max_text_chars
        self.producer_id = uuid.uuid4().hex
        self._topics = {
            "inference": self._settings.topic("inference"),
            "feedback": self._settings.topic("feedback"),
        }
        kafka = self._settings.kafka
        # Security options and acks from settings.kafka; its repr masks the password.
        self._producer_config = kafka_config.client_config(
            kafka,
            bootstrap_servers,
            producer=True,
            client_id=client_id or f"genmon-sdk-{self.producer_id[:8]}",
            # Idempotence needs acks=all; with fewer acks retries may duplicate anyway.
            enable_idempotence=kafka.acks == "all",
            compression_type=None if compression == "none" else compression,
            linger_ms=sdk.linger_ms if linger_ms is None else linger_ms,
            delivery_timeout_ms=(
                sdk.delivery_timeout_ms if delivery_timeout_ms is None else delivery_timeout_ms
            ),
            batch_size=128 * 1024,
            bootstrap_timeout_ms=_CONNECT_TIMEOUT_MS,
            max_block_ms=_CONNECT_TIMEOUT_MS,
            reconnect_backoff_max_ms=int(_BACKOFF_MAX_S * 1000),
        )

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._settled = threading.Condition(self._lock)
        self._queue: collections.deque[_Record] = collections.deque()
        self._seq = Sequences(self.producer_id, sdk.sequence_max_models)
        self._pending = 0
        self._sent = self._dropped = self._invalid = self._failed = self._truncated = 0
        self._closing = False
        self._closed = False
        self._producer: KafkaProducer | None = None
        #: model id -> the follower whose version log_inference fills in (Monitor.follow).
        self._followers: dict[str, ModelFollower | RolloutFollower] = {}
        self._warn_dropped = _RateLimitedLog()
        self._warn_invalid = _RateLimitedLog()
        self._warn_broker = _RateLimitedLog()
        self._warn_auth = _RateLimitedLog()
        self._next_login_check = 0.0
        self._refused: ConfigurationError | None = None
        self._warn_failed = _RateLimitedLog()
        self._thread = threading.Thread(
            target=self._run, name=f"genmon-monitor-{self.producer_id[:8]}", daemon=True
        )
        self._thread.start()
        _OPEN_MONITORS.add(self)

    # ----------------------------------------------------------------- caller side

    def log_inference(
        self, event: InferenceEvent | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> bool:
        """Queue one inference; ``True`` when accepted, ``False`` when dropped or invalid.

        A model followed with :meth:`follow` gets ``model_version`` = the version its alias
        points to now when the call leaves it unset. A chat call passes its turns as
        ``messages`` (dicts ``{role, content}`` or :class:`~genmon.schemas.events.ChatMessage`);
        without a ``prompt`` the last user turn's content is the prompt (:mod:`genmon.chat`).
        """
        fields = followed_fields(self._followers, event, fields)
        fields, cut = chat_fields(event, fields, self._max_text_chars)
        texts = ("prompt", "response")
        return self._log("inference", InferenceEvent, event, fields, texts, truncated=cut)

    @overload
    def follow(
        self, model_id: str, alias: Literal["rollout"], on_change: OnChange | None = None
    ) -> RolloutFollower: ...

    @overload
    def follow(
        self,
        model_id: str,
        alias: Literal["champion", "challenger", "previous"] | ModelAlias = ...,
        on_change: OnChange | None = None,
    ) -> ModelFollower: ...

    @overload
    def follow(
        self, model_id: str, alias: str, on_change: OnChange | None = None
    ) -> ModelFollower | RolloutFollower: ...

    def follow(
        self, model_id: str, alias: str = "champion", on_change: OnChange | None = None
    ) -> ModelFollower | RolloutFollower:
        """Follow ``alias`` of ``model_id`` on ``<prefix>.models`` (see :mod:`genmon.follow`);
        inferences of that model logged without ``model_version`` then carry its version.

        ``on_change(event)`` runs on each version change (load the new weights there).
        Following the same model again replaces the earlier follower; :meth:`close` stops it.

        ``alias="rollout"`` follows the champion and the challenger (a
        :class:`~genmon.follow.RolloutFollower`) so that the service can split traffic the
        way the registry asks. Route with it and log with the same request id::

            split = monitor.follow("chat", alias="rollout", on_change=load_weights)
            version = split.version_for(request_id)          # champion or challenger
            ...                                              # serve with that version
            monitor.log_inference(model_id="chat", request_id=request_id, ...)

        The inference then carries ``model_version=version``. One logged without a
        ``request_id`` gets a fresh one and the version that id maps to, which is not the
        version that served when the service routed by another key (a warning says so): pass
        the key you routed with, or ``model_version``.
        """
        options = {"bootstrap_servers": self._producer_config["bootstrap_servers"]}
        follower: ModelFollower | RolloutFollower
        if alias == ROLLOUT:
            follower = RolloutFollower(self._settings, model_id, on_change, **options)
        else:
            follower = ModelFollower(self._settings, model_id, alias, on_change, **options)
        with self._lock:
            replaced = self._followers.get(model_id)
            self._followers = {**self._followers, model_id: follower}
        if replaced is not None:
            replaced.close()
        return follower

    def log_feedback(
        self, event: FeedbackEvent | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> bool:
        """Queue one piece of feedback; same contract as :meth:`log_inference`."""
        return self._log("feedback", FeedbackEvent, event, fields, ("correction", "comment"))

    def _log(
        self,
        kind: str,
        model: type[E],
        event: E | Mapping[str, Any] | None,
        fields: dict[str, Any],
        texts: tuple[str, ...],
        *,
        truncated: bool = False,
    ) -> bool:
        validated = self._validate(model, event, fields, texts, truncated)
        if validated is None:
            return False
        model_id = validated.model_id
        value = encode(validated)
        with self._lock:
            producer, seq = self._seq.take(kind, model_id)
            if self._closing or self._pending >= self._buffer_max:
                self._dropped += 1
                dropped, closing = self._dropped, self._closing
            else:
                self._pending += 1
                self._queue.append(
                    _Record(
                        topic=self._topics[kind],
                        key=model_id.encode(),
                        value=value,
                        headers=[(HEADER_PRODUCER, producer), (HEADER_SEQ, str(seq).encode())],
                    )
                )
                self._wakeup.notify()
                return True
        self._warn_dropped(
            logging.WARNING,
            "genmon Monitor %s: dropped an event (%d in total); %s",
            self.producer_id[:8],
            dropped,
            "the monitor is closed"
            if closing
            else f"the buffer holds its limit of {self._buffer_max} events; is the broker up?",
        )
        return False

    def _validate(
        self,
        model: type[E],
        event: E | Mapping[str, Any] | None,
        fields: dict[str, Any],
        texts: tuple[str, ...],
        truncated: bool = False,
    ) -> E | None:
        if isinstance(event, model):
            if fields:
                raise TypeError("pass either an event object or keyword fields, not both")
            return event
        if isinstance(event, BaseModel):
            raise TypeError(f"expected a {model.__name__}, got a {type(event).__name__}")
        data = {**(event or {}), **fields}
        if truncated or any(
            isinstance(data.get(name), str) and len(data[name]) > self._max_text_chars
            for name in texts
        ):
            for name in texts:
                if isinstance(data.get(name), str):
                    data[name] = data[name][: self._max_text_chars]
            with self._lock:
                self._truncated += 1
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            reason, text = classify(exc)
            with self._lock:
                self._invalid += 1
            if self._on_invalid == "raise":
                raise SchemaError(f"invalid {model.__name__}: {text}", reason) from None
            self._warn_invalid(
                logging.WARNING,
                "genmon Monitor: rejected an invalid %s (%s): %s",
                model.__name__,
                reason,
                text,
            )
            return None

    @property
    def stats(self) -> MonitorStats:
        """A consistent snapshot of this monitor's counters."""
        with self._lock:
            return MonitorStats(
                sent=self._sent,
                buffered=self._pending,
                dropped=self._dropped,
                invalid=self._invalid,
                failed=self._failed,
                truncated=self._truncated,
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted event is delivered or failed; ``False`` on timeout."""
        with self._lock:
            return self._settled.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Deliver what is buffered (up to ``timeout`` seconds), then stop.

        Events still unsent when the time is up are counted as dropped.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closing = True
            followers, self._followers = list(self._followers.values()), {}
        for follower in followers:
            follower.close(timeout=1.0)
        _OPEN_MONITORS.discard(self)
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
        self._thread.join(_remaining(deadline, floor=1.0))
        producer = self._producer
        if producer is not None:
            producer.close(timeout=_remaining(deadline, floor=0.0))
        with self._lock:
            lost, self._pending = self._pending, 0
            self._dropped += lost
            self._queue.clear()
            self._settled.notify_all()
        if lost:
            log.warning(
                "genmon Monitor %s closed with %d events undelivered; they are lost",
                self.producer_id[:8],
                lost,
            )

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Monitor {self.producer_id[:8]} {self._producer_config['bootstrap_servers']}>"

    # ------------------------------------------------------------ background side

    def _run(self) -> None:
        backoff = _BACKOFF_INITIAL_S
        while not self._closed:
            try:
                producer = self._producer or self._connect()
                if producer is None or not self._drain(producer):
                    self._sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                else:
                    backoff = _BACKOFF_INITIAL_S
            except Exception:
                # The thread must outlive any surprise, or every later event is lost.
                log.exception("genmon Monitor %s: unexpected error; retrying", self.producer_id[:8])
                self._sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _connect(self) -> KafkaProducer | None:
        try:
            producer = KafkaProducer(**self._producer_config)
        except (KafkaError, OSError) as exc:
            bootstrap = self._producer_config["bootstrap_servers"]
            refused = self._refusal(exc, bootstrap)
            if refused is not None:
                # Not an outage: retrying will not help until the settings change.
                self._warn_auth(
                    logging.ERROR,
                    "genmon Monitor %s: %s; buffering and retrying",
                    self.producer_id[:8],
                    refused,
                )
                return None
            self._warn_broker(
                logging.WARNING,
                "genmon Monitor %s: cannot reach Kafka at %s (%s); buffering and retrying",
                self.producer_id[:8],
                bootstrap,
                exc,
            )
            return None
        with self._lock:
            if not self._closed:
                self._producer = producer
                return producer
        # close() already gave up on this thread; nobody else would close the producer.
        producer.close(timeout=0)
        return None

    def _refusal(self, exc: BaseException, bootstrap: str) -> ConfigurationError | None:
        """The broker's refusal of our login or certificate behind a failed connect, if that
        is the cause: kafka-python reports a refused login as a timeout, so with TLS or
        SASL the broker is asked once more (at most every few seconds, on this thread)."""
        kafka = self._settings.kafka
        if kafka_config.is_auth_failure(exc):
            return kafka_config.auth_failure(kafka, exc, bootstrap)
        now = time.monotonic()
        if kafka.security_protocol == "PLAINTEXT" or now < self._next_login_check:
            return self._refused  # the last answer, until it is time to ask again
        self._next_login_check = now + _LOG_EVERY_S
        try:
            kafka_config.check_login(kafka, bootstrap, timeout_s=_CONNECT_TIMEOUT_MS / 1000)
            self._refused = None
        except ConfigurationError as refused:
            self._refused = refused
        return self._refused

    def _drain(self, producer: KafkaProducer) -> bool:
        """Hand queued events to the producer; ``False`` when the broker stalled us."""
        with self._lock:
            self._wakeup.wait_for(lambda: bool(self._queue) or self._closed, timeout=1.0)
            batch = list(itertools.islice(self._queue, _SEND_BATCH))
        handed = 0
        try:
            for record in batch:
                try:
                    future = producer.send(
                        record.topic, value=record.value, key=record.key, headers=record.headers
                    )
                except KafkaTimeoutError:
                    raise
                except KafkaError as exc:
                    # A record the producer refuses outright (too large, ...) will never succeed.
                    handed += 1
                    self._on_failed(exc)
                    continue
                handed += 1
                future.add_callback(self._on_sent)
                future.add_errback(self._on_failed)
        except KafkaTimeoutError as exc:
            self._warn_broker(
                logging.WARNING,
                "genmon Monitor %s: Kafka does not answer (%s); buffering and retrying",
                self.producer_id[:8],
                exc,
            )
            return False
        finally:
            with self._lock:
                # close() may have emptied the queue while this thread was still sending.
                for _ in range(min(handed, len(self._queue))):
                    self._queue.popleft()
        return True

    def _on_sent(self, _metadata: object) -> None:
        with self._lock:
            self._sent += 1
            self._settle_one()

    def _on_failed(self, exc: BaseException) -> None:
        with self._lock:
            self._failed += 1
            self._settle_one()
        self._warn_failed(
            logging.ERROR,
            "genmon Monitor %s: an event could not be delivered: %r",
            self.producer_id[:8],
            exc,
        )

    def _settle_one(self) -> None:
        self._pending = max(self._pending - 1, 0)
        if self._pending == 0:
            self._settled.notify_all()

    def _sleep(self, seconds: float) -> None:
        with self._lock:
            self._wakeup.wait_for(lambda: self._closed, timeout=seconds)


#: Monitors not closed yet; the interpreter gives them a last chance to deliver at exit.
_OPEN_MONITORS: weakref.WeakSet[Monitor] = weakref.WeakSet()
_CLOSE_AT_EXIT_S = 5.0


@atexit.register
def _close_open_monitors() -> None:
    for monitor in list(_OPEN_MONITORS):
        monitor.close(timeout=_CLOSE_AT_EXIT_S)


def _remaining(deadline: float | None, *, floor: float) -> float | None:
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), floor)
