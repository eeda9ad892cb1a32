"""Following a model's alias on ``<prefix>.models``: which version should serve now.

The registry announces every alias move as a :class:`~genmon.schemas.events.ModelEvent`
keyed by model id. A :class:`ModelFollower` reads that topic with no consumer group (each
follower reads everything, commits nothing, and never rebalances with the others): it
assigns itself every partition, seeks to the beginning, replays to the end to learn the
latest event of its model and alias, then follows new ones in a background thread.

>>> follower = ModelFollower(settings, "chat")          # doctest: +SKIP
>>> follower.wait_ready(30); follower.version           # doctest: +SKIP
'v3'

Announcements are at least once: repeats (same ``event_id``) are dropped, and an event
that names the version already followed (a re-announcement) is no change. ``on_change``
runs in the follower's thread, once for the state found by the replay and then once per
change; what it raises is logged, never fatal. A broker that is down or a topic not
created yet is retried with backoff; after a reconnection the topic is replayed again.

Needs only kafka-python (the SDK's client): serving code that loads weights builds on it
(:class:`genmon.retrain.follower.AdapterFollower`).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import BaseModel

from genmon.exceptions import ConfigurationError, SchemaError
from genmon.schemas.codec import decode
from genmon.schemas.events import ModelAlias, ModelEvent
from genmon.settings import Settings, get_settings

__all__ = ["ModelFollower", "OnChange", "followed_fields"]

log = logging.getLogger(__name__)

_POLL_MS: Final = 200
_BACKOFF_INITIAL_S: Final = 0.5
_BACKOFF_MAX_S: Final = 10.0
_SEEN_EVENT_IDS: Final = 4096
_CONNECT_TIMEOUT_MS: Final = 5000

OnChange = Callable[[ModelEvent], object]


class ModelFollower:
    """The latest announced version of one alias of one model, kept current in a thread.

    Args:
        settings: Kafka address and topic prefix; defaults to :func:`get_settings`.
        model_id: the model to follow.
        alias: ``champion`` (what should serve), ``challenger`` or ``previous``.
        on_change: called with each event that changes the version (or its artifact).
        bootstrap_servers: overrides ``settings.kafka.bootstrap_servers``.
        start: start the thread now (else call :meth:`start`).
    """

    def __init__(
        self,
        settings: Settings | None,
        model_id: str,
        alias: str | ModelAlias = ModelAlias.CHAMPION,
        on_change: OnChange | None = None,
        *,
        bootstrap_servers: str | None = None,
        start: bool = True,
    ) -> None:
        self.settings = settings or get_settings()
        try:
            self.alias = ModelAlias(alias)
        except ValueError:
            choices = ", ".join(a.value for a in ModelAlias)
            raise ConfigurationError(f"alias {alias!r} is not one of {choices}") from None
        self.model_id = model_id
        self.topic = self.settings.topic("models")
        self.on_change = on_change
        self._bootstrap = bootstrap_servers or self.settings.kafka.bootstrap_servers
        self._key = model_id.encode()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._event: ModelEvent | None = None
        self._ready = False
        self._closed = False
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._thread = threading.Thread(
            target=self._run, name=f"genmon-follow-{model_id[:24]}-{self.alias.value}", daemon=True
        )
        if start:
            self.start()

    # ------------------------------------------------------------------- caller side

    def start(self) -> ModelFollower:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    @property
    def event(self) -> ModelEvent | None:
        """The event that set the current state (``None``: nothing announced yet)."""
        with self._lock:
            return self._event

    @property
    def version(self) -> str | None:
        """The version the alias points to (``None``: unknown yet, or unset)."""
        event = self.event
        return event.version if event is not None else None

    @property
    def ready(self) -> bool:
        """Whether the topic was replayed to its end once (the version is the latest)."""
        with self._lock:
            return self._ready

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the replay reached the end of the topic; ``False`` on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self._ready or self._closed, timeout) and (
                self._ready
            )

    def wait_for(self, version: str | None, timeout: float | None = None) -> bool:
        """Block until the alias points to ``version``; ``False`` on timeout."""
        with self._lock:
            return self._changed.wait_for(
                lambda: self._closed or (self._ready and self._current() == version), timeout
            ) and (self._current() == version)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop following (the thread ends within one poll)."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> ModelFollower:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ModelFollower {self.model_id} {self.alias.value}={self.version}>"

    def _current(self) -> str | None:
        return self._event.version if self._event is not None else None

    # ---------------------------------------------------------------- background side

    def _run(self) -> None:
        backoff = _BACKOFF_INITIAL_S
        while not self._closed:
            consumer: KafkaConsumer | None = None
            try:
                consumer = self._consumer()
                if self._follow(consumer):
                    backoff = _BACKOFF_INITIAL_S
                    continue
            except (KafkaError, OSError) as exc:
                log.warning(
                    "following %s %s on %s: %s; retrying in %.1f s",
                    self.model_id,
                    self.alias.value,
                    self.topic,
                    exc,
                    backoff,
                )
            except Exception:
                # The thread must outlive any surprise, or the service serves a stale version.
                log.exception("following %s on %s failed; retrying", self.model_id, self.topic)
            finally:
                if consumer is not None:
                    consumer.close()
            self._sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id=f"genmon-follow-{self.model_id[:32]}",
            request_timeout_ms=max(_CONNECT_TIMEOUT_MS * 2, 10_000),
            reconnect_backoff_max_ms=int(_BACKOFF_MAX_S * 1000),
        )

    def _follow(self, consumer: KafkaConsumer) -> bool:
        """Replay, then follow until closed; ``False`` when the topic does not exist yet."""
        partitions = [
            TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic)
        ]
        if not partitions:
            self._mark_ready(None)  # nothing was ever announced
            return False
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        latest: ModelEvent | None = None
        while not self._closed and any(consumer.position(tp) < ends[tp] for tp in partitions):
            for event in self._poll(consumer):
                latest = event
        if self._closed:
            return True
        self._mark_ready(latest)
        while not self._closed:
            for event in self._poll(consumer):
                self._apply(event)
        return True

    def _poll(self, consumer: KafkaConsumer) -> list[ModelEvent]:
        """The new events of this model and alias, repeats dropped, in topic order."""
        found = []
        for records in consumer.poll(timeout_ms=_POLL_MS).values():
            for record in records:
                if record.key != self._key:
                    continue
                try:
                    event = decode(record.value, ModelEvent)
                except SchemaError as exc:
                    log.warning("skipping a malformed model event at %s: %s", record.offset, exc)
                    continue
                if event.model_id != self.model_id or event.alias is not self.alias:
                    continue
                if event.event_id in self._seen:
                    continue
                self._seen[event.event_id] = None
                if len(self._seen) > _SEEN_EVENT_IDS:
                    self._seen.popitem(last=False)
                found.append(event)
        return found

    def _mark_ready(self, latest: ModelEvent | None) -> None:
        if latest is not None:
            self._apply(latest)
        with self._lock:
            self._ready = True
            self._changed.notify_all()

    def _apply(self, event: ModelEvent) -> None:
        with self._lock:
            now = self._event
            if now is not None and _serves(now) == _serves(event):
                return
            self._event = event
            self._changed.notify_all()
        log.info("%s %s -> %s (%s)", self.model_id, self.alias.value, event.version, event.action)
        if self.on_change is None:
            return
        try:
            self.on_change(event)
        except Exception:
            log.exception("on_change of the follower of %s raised; following on", self.model_id)

    def _sleep(self, seconds: float) -> None:
        with self._lock:
            self._changed.wait_for(lambda: self._closed, timeout=seconds)


def _serves(event: ModelEvent) -> tuple[str | None, str | None, str | None]:
    """What a server loads for ``event``: the same triple means nothing to reload."""
    return event.version, event.artifact_uri, event.base_uri


def followed_fields(
    followers: Mapping[str, ModelFollower],
    event: BaseModel | Mapping[str, Any] | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """``fields`` with ``model_version`` set to the followed version of the event's model,
    when the caller left it unset (the SDK hook of :meth:`genmon.Monitor.follow`).

    An event object, a version given by the caller, a model not followed or a follower
    that knows no version yet leave ``fields`` as they are.
    """
    if isinstance(event, BaseModel) or not followers:
        return fields
    data = {**(event or {}), **fields}
    if data.get("model_version") is not None:
        return fields
    follower = followers.get(str(data.get("model_id")))
    version = follower.version if follower is not None else None
    if version is None:
        return fields
    return {**fields, "model_version": version}
