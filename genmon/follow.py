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

The rollout contract
--------------------
genmon routes no traffic; a rollout is a contract with the serving system. While a
retrained version is watched, the registry points ``challenger`` at it and announces it with
``traffic_share`` (the retrain policy's share, 10 % by default). The serving system

1. routes each request with :meth:`RolloutFollower.version_for` ``(request_id)`` (or
   ``Monitor.follow(model, alias="rollout")``): that share of keys goes to the challenger,
   the same key always to the same version while the split is unchanged, and a larger share
   keeps the keys a smaller one sent to the challenger. A service in another language splits
   the same way with :func:`traffic_bucket`: the first 8 bytes of
   ``sha256(model_id + "\\0" + key)`` as a big-endian integer over ``2**64``, below the share
   -> challenger;
2. logs every inference with the version that served it (``model_version``) and the
   ``request_id`` it routed with: the watch compares the two versions on those logs only;
3. stops the challenger when it is unset (an event with ``version`` None: rolled back,
   cancelled, or confirmed, in which case ``champion`` moves to it too): everything goes to
   the champion again. A challenger announced without a share gets no traffic.

>>> with RolloutFollower(settings, "chat") as split:      # doctest: +SKIP
...     split.wait_ready(30)
...     version = split.version_for(request_id)            # serve with it, log it
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import BaseModel

from genmon import kafka_config
from genmon.exceptions import ConfigurationError, SchemaError
from genmon.schemas.codec import decode
from genmon.schemas.events import ModelAlias, ModelEvent, new_id
from genmon.settings import Settings, get_settings

__all__ = [
    "ROLLOUT",
    "ModelFollower",
    "OnChange",
    "RolloutFollower",
    "followed_fields",
    "traffic_bucket",
]

log = logging.getLogger(__name__)

_POLL_MS: Final = 200
_BACKOFF_INITIAL_S: Final = 0.5
_BACKOFF_MAX_S: Final = 10.0
_SEEN_EVENT_IDS: Final = 4096
_CONNECT_TIMEOUT_MS: Final = 5000

OnChange = Callable[[ModelEvent], object]
#: The pseudo-alias of :meth:`genmon.Monitor.follow` that follows a rollout's split.
ROLLOUT: Final = "rollout"


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
        # TLS/SASL from settings.kafka, checked (and the CA loaded) once, here.
        self._client_config = kafka_config.client_config(
            self.settings.kafka,
            self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id=f"genmon-follow-{model_id[:32]}",
            request_timeout_ms=max(_CONNECT_TIMEOUT_MS * 2, 10_000),
            reconnect_backoff_max_ms=int(_BACKOFF_MAX_S * 1000),
        )
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
                refused = kafka_config.is_auth_failure(exc)
                log.log(
                    logging.ERROR if refused else logging.WARNING,
                    "following %s %s on %s: %s; retrying in %.1f s",
                    self.model_id,
                    self.alias.value,
                    self.topic,
                    kafka_config.auth_failure(self.settings.kafka, exc, self._bootstrap)
                    if refused
                    else exc,
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
        return KafkaConsumer(**self._client_config)

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
            if now is not None and self._same(now, event):
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

    def _same(self, now: ModelEvent, event: ModelEvent) -> bool:
        """Whether ``event`` changes nothing the follower's user acts on."""
        return _serves(now) == _serves(event)

    def _sleep(self, seconds: float) -> None:
        with self._lock:
            self._changed.wait_for(lambda: self._closed, timeout=seconds)


def _serves(event: ModelEvent) -> tuple[str | None, str | None, str | None]:
    """What a server loads for ``event``: the same triple means nothing to reload."""
    return event.version, event.artifact_uri, event.base_uri


class _ShareFollower(ModelFollower):
    """A follower for which a new traffic share of the same version is a change too."""

    def _same(self, now: ModelEvent, event: ModelEvent) -> bool:
        return super()._same(now, event) and now.traffic_share == event.traffic_share


def traffic_bucket(model_id: str, key: str) -> float:
    """Where ``key`` falls in ``[0, 1)`` for ``model_id``'s split: uniform over keys, the same
    in every process and language (sha256; never Python's salted ``hash()``)."""
    digest = hashlib.sha256(f"{model_id}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class RolloutFollower:
    """The champion and the challenger of one model, and how to split traffic between them.

    Two :class:`ModelFollower` (one per alias) keep the state current; see "The rollout
    contract" above for what serving does with it.

    Args:
        settings: Kafka address and topic prefix; defaults to :func:`get_settings`.
        model_id: the model whose rollout to follow.
        on_change: called with each event that changes either alias (the version, its
            artifact, or the challenger's share); once per alias for the state the replay
            found. Calls never overlap, but may come from either follower's thread.
        bootstrap_servers: overrides ``settings.kafka.bootstrap_servers``.
        start: start following now (else call :meth:`start`).
    """

    def __init__(
        self,
        settings: Settings | None,
        model_id: str,
        on_change: OnChange | None = None,
        *,
        bootstrap_servers: str | None = None,
        start: bool = True,
    ) -> None:
        self.model_id = model_id
        self.on_change = on_change
        self._callback_lock = threading.Lock()
        self._warned_unkeyed = False
        options: dict[str, Any] = {"bootstrap_servers": bootstrap_servers, "start": False}
        self.followers: dict[ModelAlias, ModelFollower] = {
            ModelAlias.CHAMPION: ModelFollower(
                settings, model_id, ModelAlias.CHAMPION, self._changed, **options
            ),
            ModelAlias.CHALLENGER: _ShareFollower(
                settings, model_id, ModelAlias.CHALLENGER, self._changed, **options
            ),
        }
        self.settings = self.followers[ModelAlias.CHAMPION].settings
        self.topic = self.followers[ModelAlias.CHAMPION].topic
        if start:
            self.start()

    def start(self) -> RolloutFollower:
        for follower in self.followers.values():
            follower.start()
        return self

    @property
    def champion(self) -> str | None:
        """The version serving the traffic the challenger does not get (``None``: unknown)."""
        return self.followers[ModelAlias.CHAMPION].version

    @property
    def challenger(self) -> str | None:
        """The version on trial (``None``: no rollout, or it ended)."""
        return self.followers[ModelAlias.CHALLENGER].version

    @property
    def share(self) -> float:
        """The challenger's share of traffic: its ``traffic_share``, 0 when none is set."""
        event = self.followers[ModelAlias.CHALLENGER].event
        if event is None or event.version is None:
            return 0.0
        return event.traffic_share or 0.0

    @property
    def ready(self) -> bool:
        """Whether both aliases were replayed to the end of the topic once."""
        return all(follower.ready for follower in self.followers.values())

    def version_for(self, key: str) -> str | None:
        """The version that serves ``key`` (a request id; a user id for sticky users): the
        challenger for a ``share`` of keys (:func:`traffic_bucket`), else the champion.

        ``None`` only while the champion is unknown and the key is not the challenger's.
        """
        challenger, share = self.challenger, self.share
        if challenger is not None and traffic_bucket(self.model_id, key) < share:
            return challenger
        return self.champion

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until both aliases were replayed; ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(
            follower.wait_ready(None if deadline is None else max(deadline - time.monotonic(), 0))
            for follower in self.followers.values()
        )

    def wait_for(
        self, alias: str | ModelAlias, version: str | None, timeout: float | None = None
    ) -> bool:
        """Block until ``alias`` (champion or challenger) points to ``version``; ``False`` on
        timeout. ``version=None`` waits for the challenger to be unset."""
        try:
            follower = self.followers[ModelAlias(alias)]
        except (ValueError, KeyError):
            raise ConfigurationError(
                f"a rollout follows champion and challenger, not {alias!r}"
            ) from None
        return follower.wait_for(version, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop following both aliases."""
        for follower in self.followers.values():
            follower.close(timeout)

    def __enter__(self) -> RolloutFollower:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<RolloutFollower {self.model_id} champion={self.champion} "
            f"challenger={self.challenger} share={self.share:g}>"
        )

    def _changed(self, event: ModelEvent) -> None:
        """Both followers' callback: one user callback at a time (their threads differ)."""
        if self.on_change is None:
            return
        with self._callback_lock:
            self.on_change(event)

    def _drawn_request_id(self) -> str:
        """A request id for an inference logged without one; warns once per follower while a
        challenger has traffic, since the caller cannot have routed with it."""
        if self.share > 0 and not self._warned_unkeyed:
            self._warned_unkeyed = True
            log.warning(
                "an inference of %s was logged without request_id during a rollout: genmon "
                "drew one and logged the version it maps to; log the request_id you routed "
                "with (version_for(request_id)), or model_version, or the watch compares "
                "the wrong responses",
                self.model_id,
            )
        return new_id()


def followed_fields(
    followers: Mapping[str, ModelFollower | RolloutFollower],
    event: BaseModel | Mapping[str, Any] | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """``fields`` with ``model_version`` set to the followed version of the event's model,
    when the caller left it unset (the SDK hook of :meth:`genmon.Monitor.follow`).

    A rollout's version is the one :meth:`RolloutFollower.version_for` gives the event's
    ``request_id``; one is drawn (and set) when the caller gave none, so that the log and
    the split agree. An event object, a version given by the caller, a model not followed
    or a follower that knows no version yet leave ``fields`` as they are.
    """
    if isinstance(event, BaseModel) or not followers:
        return fields
    data = {**(event or {}), **fields}
    if data.get("model_version") is not None:
        return fields
    follower = followers.get(str(data.get("model_id")))
    if isinstance(follower, RolloutFollower):
        return _split_fields(follower, data, fields)
    version = follower.version if follower is not None else None
    if version is None:
        return fields
    return {**fields, "model_version": version}


def _split_fields(
    follower: RolloutFollower, data: Mapping[str, Any], fields: dict[str, Any]
) -> dict[str, Any]:
    request_id = data.get("request_id")
    drawn = {} if request_id is not None else {"request_id": follower._drawn_request_id()}
    version = follower.version_for(str(drawn.get("request_id", request_id)))
    if version is None:
        return fields
    return {**fields, **drawn, "model_version": version}
