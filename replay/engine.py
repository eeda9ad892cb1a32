"""``genmon replay FILE``: what the worker would have paged on a recorded stream, in seconds.

A replay runs the worker's own code on a file instead of Kafka: ingest validation (the
native decoder, pydantic for what it defers, dead letters counted by reason), the
window state (windows, feedback join, late and future events), the detector runner
(baselines, budgeted tests, SLOs), the embedding sampler and drift detectors, and the
incident manager (grouping links, auto-resolve, reopen cool-downs, silences) over a
migrated database. Only the transports differ: events come from lines, windows and
findings go straight to the next stage, pages are read from the outbox instead of being
delivered (so delivery retries never arise).

**Time.** Every timer runs on a clock driven by event time: the clock is the latest
arrival seen (an inference arrives when it finished, feedback when it was given), so
watermarks, the idle close of a quiet model, the window-closing timer
(``windows.close_interval_s``), the early looks at open windows (every
``detectors.early_interval_s``), the embedding sampler's sub-samples (one per
``embedding.flush_interval_s`` of event time), auto-resolve, grouping and cool-downs
happen when they would have, as fast as the machine allows. At the end the clock moves past the last
window so every window closes.

**Input.** One JSON object per line in the SDK's wire schema (``genmon schemas
export``), inference and feedback events mixed, told apart by their fields (an inference
has ``latency_ms``), in the order they were produced. Embeddings (on by default, as in the
worker) are cached by text hash in ``--embedding-cache`` so a second replay of the same
texts does not encode again; sampling is seeded (``--seed``), so a replay is repeatable.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry

from genmon.replay.point_log import PointLog
from genmon.schemas.events import FeedbackEvent, Finding
from genmon.settings import DestinationSettings, Settings
from genmon.streams.detection.embedding_series import embedding_key
from genmon.streams.detection.runner import DetectorRunner
from genmon.streams.partitioning import partition_for
from genmon.streams.windows.state import WindowState
from genmon.streams.windows.store import DictStore

#: The outbox destination a replay pages (nothing is delivered).
REPLAY_DESTINATION = "replay"


@dataclass(frozen=True)
class Page:
    """One notification the receivers would have got."""

    at: str
    incident_id: str
    transition: str
    severity: str
    title: str


@dataclass
class ReplayReport:
    pages: list[Page] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    #: Every judgement, bounded (``Replay(collect_points=True)``; what ``--report`` charts).
    points: PointLog | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pages": [asdict(page) for page in self.pages],
            "incidents": self.incidents,
            "counts": self.counts,
        }

    @property
    def triggers(self) -> list[Page]:
        """The pages that call someone: triggers (an incident opened or reopened)."""
        return [page for page in self.pages if page.transition == "trigger"]


class EmbeddingCache:
    """Embeddings by SHA-256 of the text, in a SQLite file (or in memory)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path else ":memory:")
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
        self.hits = self.misses = 0

    def encode(self, encoder: Callable[[], Any], texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``; ``encoder()`` is asked for the model only on a miss."""
        keys = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in self._db.execute(
                f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk
            ):
                found[key] = np.frombuffer(blob, dtype=np.float32)
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in found}.items())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            vectors = np.asarray(encoder().encode([text for _, text in missing]), dtype=np.float32)
            for (key, _), vector in zip(missing, vectors, strict=True):
                found[key] = vector
            self._db.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?)",
                [
                    (key, vector.tobytes())
                    for (key, _), vector in zip(missing, vectors, strict=True)
                ],
            )
            self._db.commit()
        return np.stack([found[key] for key in keys])

    def close(self) -> None:
        self._db.close()


class Replay:
    """Feed lines with :meth:`feed`, then :meth:`finish` for the report."""

    def __init__(
        self,
        settings: Settings,
        *,
        database_url: str | None = None,
        embeddings: bool | None = None,
        embedding_cache: Path | None = None,
        encoder: Any = None,
        seed: int = 0,
        keep_findings: bool = False,
        collect_points: bool = False,
    ) -> None:
        """``keep_findings``: also return every finding (detected and clear) in the report
        (memory grows with the stream; the tests compare them with the live worker's).
        ``collect_points``: keep every judgement for charts, in bounded memory
        (:class:`~genmon.replay.point_log.PointLog`)."""
        from genmon.db import make_engine, upgrade
        from genmon.incidents.manager import IncidentManager

        destination = DestinationSettings(
            name=REPLAY_DESTINATION, type="webhook", url="http://replay.invalid/"
        )
        notify = settings.notify.model_copy(
            update={"destinations": [destination], "routes": [], "destinations_file": None}
        )
        use_embeddings = settings.embedding.enabled if embeddings is None else embeddings
        # Without embeddings nothing loads the sentence encoder: error analysis then
        # clusters affected examples with TF-IDF, as a worker with the stage off does.
        embedding = settings.embedding.model_copy(update={"enabled": use_embeddings})
        self.settings = settings.model_copy(update={"notify": notify, "embedding": embedding})
        self.partitions = settings.kafka.partitions
        self.inference_topic = settings.topic("inference")
        self.feedback_topic = settings.topic("feedback")
        self.now = 0.0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if database_url is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="genmon-replay-")
            database_url = f"sqlite:///{Path(self._tmp.name) / 'replay.sqlite'}"
        upgrade(database_url)
        self.engine = make_engine(database_url)
        self.manager = IncidentManager(self.engine, self.settings, clock=self._datetime)
        self.core = WindowState(self.settings, DictStore(), clock=self._clock, buffered=True)
        self.runner = DetectorRunner(self.settings)
        self.runner.refresh = None  # judged as recorded, never on a live database's requests
        self.points = PointLog() if collect_points else None
        if self.points is not None:
            self.runner.points = self.points.add
        self.ingestor = _ingestor(self.settings)
        self.detector_state: dict[str, dict[str, Any]] = {}
        self.embedding_state = DictStore()
        self.sampler = _sampler(self.settings, seed) if use_embeddings else None
        self.encoder = encoder
        self.cache = EmbeddingCache(embedding_cache) if use_embeddings else None
        self.counts: Counter[str] = Counter()
        self.findings: list[Finding] | None = [] if keep_findings else None
        self._offsets: Counter[tuple[str, int]] = Counter()
        self._partition_of: dict[str, int] = {}
        self._inferences: list[Any] = []
        self._feedback: list[Any] = []
        self._since_flush = 0
        self._tick_at: float | None = None
        self._wake = -math.inf  # no timer can be due before this (see _run_timers)
        self._batch_size = settings.worker.batch_size
        self._peek_every = settings.detectors.early_interval_s
        self._peek_at = 0.0 if self._peek_every else math.inf  # next early look
        w = settings.windows
        self._timers = _Timers(
            self.core.plan.pane_ms / 1000, w.allowed_lateness_s, w.idle_timeout_s
        )
        # The sampler's slots (embedding.flush_interval_s), crossed without lateness.
        self._slots = _Timers(settings.embedding.flush_interval_s, 0.0, w.idle_timeout_s)

    # -- input ---------------------------------------------------------------------------
    def feed(self, lines: Iterable[bytes | str]) -> None:
        """Replay lines in order (blank lines are skipped)."""
        timers = self._timers
        for raw in lines:
            line = raw.encode() if isinstance(raw, str) else raw
            if not line.strip():
                continue
            route = _route(line)
            if route.arrival is not None:
                if route.arrival >= self._wake:
                    self._run_timers(route.arrival)
                if route.arrival >= self._peek_at:
                    self._look(route.arrival)
                self.now = max(self.now, route.arrival)
            self._enqueue(line, route.model, route.inference)
            if route.model is not None and timers.saw(route.model, route.started, self.now):
                # A window of the model may close: at the timer's next tick, which the
                # events arriving before it precede (others' crossings share that tick).
                self._tick_at = self._tick_at or self._next_tick_after(self.now)
                self._wake = min(self._wake, self._tick_at)
            if self._slot_ended(route):
                # A sub-sample of sampled texts ends: the sampler flushes it at that tick.
                self._tick_at = self._tick_at or self._next_tick_after(self.now)
                self._wake = min(self._wake, self._tick_at)
            if len(self._inferences) + len(self._feedback) >= self._batch_size:
                self._process()

    def _run_timers(self, until: float) -> None:
        """The closing timer's ticks due before ``until`` that find work: one after a
        model's watermark crossed a pane boundary, and one per ``windows.close_interval_s``
        while a model with windows open has been idle for ``windows.idle_timeout_s``
        (its watermark then advances with the clock), on the timer's grid of
        ``windows.close_interval_s``, as in the worker. Sets ``_wake``, the earliest time
        one may be due again (events only postpone idle ticks, so it is never late)."""
        interval = self.settings.windows.close_interval_s
        while True:
            idle = self._timers.next_idle_tick()
            at = min(
                (t for t in (self._tick_at, None if idle is None else self._grid(idle)) if t),
                default=None,
            )
            if at is None or at > until:
                self._wake = math.inf if at is None else at
                return
            self._process()
            self.now = max(self.now, at)
            self._tick()
            if self._tick_at is not None and self._tick_at <= at:
                self._tick_at = None
            if idle is not None and self._grid(idle) <= at:
                self._timers.ticked(at, interval, self.core.models_with_panes() | self._sampling())

    def _look(self, until: float) -> None:
        """The worker's early looks (every ``detectors.early_interval_s``) due before
        ``until``: the events before them applied, each open window whose traffic changed
        judged as it stands. Only the last look before ``until`` can see new events, so
        the ones before it are skipped."""
        self._process()
        self.now = max(self.now, self._peek_at)
        for partition in self.core.partitions:
            for window in self.core.open_windows(partition):
                model = window["model_id"]
                only = (model, int(window["end_ms"]))
                state, findings = self.runner.peek(
                    self.detector_state.get(model),
                    window,
                    lambda: next(iter(self.core.open_windows(partition, only=only)), None),  # noqa: B023
                )
                if findings and state is not None:
                    self.detector_state[model] = state
                    self.counts["early_findings"] += len(findings)
                self._apply(findings)
        self._peek_at = (math.floor(until / self._peek_every) + 1) * self._peek_every

    def _slot_ended(self, route: _Route) -> bool:
        """Whether an inference takes its model's watermark past a sampler slot's end."""
        if self.sampler is None or not route.inference or route.model is None:
            return False
        return route.arrival is not None and self._slots.saw(route.model, route.arrival, self.now)

    def _grid(self, t: float) -> float:
        """The timer's first tick at or after ``t``."""
        interval = self.settings.windows.close_interval_s
        return math.ceil(t / interval) * interval

    def _next_tick_after(self, t: float) -> float:
        interval = self.settings.windows.close_interval_s
        return (math.floor(t / interval) + 1) * interval

    def _sampling(self) -> set[str]:
        return set() if self.sampler is None else self.sampler.open_models()

    def finish(self) -> ReplayReport:
        """Close every window (the clock moves past them) and report what paged."""
        self._run_timers(self.now + self.settings.windows.close_interval_s)
        self._process()
        w = self.settings.windows
        drain = self.core.plan.longest_ms / 1000 + w.idle_timeout_s + 2 * w.close_interval_s
        end = self.now + drain
        while self.now < end:
            self.now += w.close_interval_s
            self._tick()
        self.core.flush()
        report = self._report()
        if self.cache is not None:
            self.cache.close()
        self.engine.dispose()
        if self._tmp is not None:
            self._tmp.cleanup()
        return report

    def _enqueue(self, line: bytes, model: str | None, is_inference: bool) -> None:
        topic = self.inference_topic if is_inference else self.feedback_topic
        partition = 0
        if model:
            partition = self._partition_of.get(model, -1)
            if partition < 0:
                partition = self._partition_of[model] = partition_for(model, self.partitions)
        offset = self._offsets[(topic, partition)]
        self._offsets[(topic, partition)] += 1
        message = _Message(topic, partition, offset, model.encode() if model else None, line)
        (self._inferences if is_inference else self._feedback).append(message)

    # -- the worker's stages ---------------------------------------------------------------
    def _process(self) -> None:
        """What the ingest handlers and the pipeline's sinks do with a fetched batch."""
        if self._inferences:
            messages, self._inferences = self._inferences, []
            batch, dead = self.ingestor.validate_inferences(messages)
            self._dead(dead)
            for partition in batch.partitions():
                out = self.core.on_batch(partition, batch)
                self.counts["labelled_examples"] += len(out.examples)
                self.core.checkpoint(partition)
            if self.sampler is not None and len(batch):
                self.sampler.offer(batch.events, self.now)
            self._since_flush += len(messages)
        if self._feedback:
            messages, self._feedback = self._feedback, []
            result = self.ingestor.validate(FeedbackEvent, messages)
            self._dead(result.dead)
            grouped: dict[int, list[tuple[int | None, Any]]] = defaultdict(list)
            for (partition, offset), event in zip(result.positions, result.valid, strict=True):
                grouped[partition].append((offset, event))
            for partition, items in grouped.items():
                out = self.core.on_feedback(partition, items, checkpoint=False)
                self.counts["labelled_examples"] += len(out.examples)
                self.core.checkpoint(partition)
            self._since_flush += len(messages)
        if self._since_flush >= self.settings.worker.commit_every:
            self.core.flush()  # what the worker does before each offset commit
            self._since_flush = 0

    def _dead(self, dead: Sequence[tuple[bytes | None, Any]]) -> None:
        for _, record in dead:
            self.counts[f"dead_letter:{record.reason}"] += 1

    def _tick(self) -> None:
        """The window-closing timer, then the embedding sampler's flush."""
        for partition in self.core.partitions:
            windows = self.core.due_windows(partition)
            self.core.windows_sent(partition, windows)
            for window in windows:
                self._on_window(window)
        if self.sampler is not None:
            self._embed(self.sampler.due(self.now))

    def _on_window(self, window: dict[str, Any]) -> None:
        model = window["model_id"]
        state, findings = self.runner.on_window(self.detector_state.get(model), window)
        self.detector_state[model] = state
        self._apply(findings)

    def _embed(self, requests: Sequence[Any]) -> None:
        samples: dict[str, list[Any]] = defaultdict(list)
        for request in requests:
            samples[request.sample_id].append(request)
        for parts in samples.values():
            first = parts[0]
            texts = [part.text for part in sorted(parts, key=lambda p: p.index)]
            assert self.cache is not None
            array = self.cache.encode(self._encoder, texts)
            self.counts["embedded_texts"] += len(texts)
            self._apply(self._embedding_sample(first, array, texts))

    def _embedding_sample(self, first: Any, array: np.ndarray, texts: list[str]) -> list[Finding]:
        """:meth:`genmon.streams.pipeline.Pipeline.submit_embeddings` on dict stores."""
        store, model = self.embedding_state, first.model_id
        key = embedding_key(model, first.model_version, first.field)
        index = self.runner.admit_embedding_series(
            store, 0, model, first.model_version, first.field, first.window_end
        )
        state, findings = self.runner.on_embeddings(
            store.get(key),
            model,
            first.model_version,
            first.field,
            first.window_end,
            array,
            series=self.runner.field_series(index, first.field),
            texts=texts,
        )
        store.put(0, key, state)
        return findings

    def _apply(self, findings: list[Finding]) -> None:
        if not findings:
            return
        if self.findings is not None:
            self.findings += findings
        self.counts["findings_detected"] += sum(f.detected for f in findings)
        self.manager.process_many(findings)

    def _encoder(self) -> Any:
        if self.encoder is None:
            from genmon.streams.embedding.encoder import shared_encoder

            self.encoder = shared_encoder(self.settings.embedding)
        return self.encoder

    # -- clocks and the report ----------------------------------------------------------------
    def _clock(self) -> float:
        return self.now

    def _datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def _report(self) -> ReplayReport:
        from sqlmodel import select

        from genmon.db import session_scope
        from genmon.schemas.incidents import Incident, Notification

        with session_scope(self.engine) as session:
            rows = session.exec(
                select(Notification)
                .where(Notification.destination == REPLAY_DESTINATION)
                .order_by(Notification.id)
            ).all()
            pages = [
                Page(
                    at=row.created_at.replace(tzinfo=UTC).isoformat()
                    if row.created_at.tzinfo is None
                    else row.created_at.isoformat(),
                    incident_id=row.incident_id,
                    transition=row.event.value,
                    severity=row.payload["incident"]["severity"],
                    title=row.payload["incident"]["title"],
                )
                for row in rows
            ]
            incidents = [
                _incident_summary(row)
                for row in session.exec(select(Incident).order_by(Incident.opened_at)).all()
            ]
        c = self.core.counters
        counts = {
            "inference_events": c.inference_events,
            "feedback_events": c.feedback_events,
            "late_events": c.late_events,
            "future_events": c.skew_dropped,
            "windows_closed": c.windows_closed,
            "joined_feedback": c.joined,
            "incidents": len(incidents),
            "pages": len(pages),
            "triggers": sum(page.transition == "trigger" for page in pages),
            **dict(sorted(self.counts.items())),
        }
        if self.cache is not None:
            counts["embedding_cache_hits"] = self.cache.hits
        return ReplayReport(pages, incidents, counts, self.findings or [], points=self.points)


class _Message(NamedTuple):
    """What ingest reads of a Kafka record (:class:`~genmon.streams.ingest.SourceMessage`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[()] = ()


class _Route(NamedTuple):
    arrival: float | None
    model: str | None
    inference: bool
    started: float | None = None


def _route(line: bytes) -> _Route:
    """Arrival time, model and kind of a line, and an inference's event time; Nones where
    unreadable (ingest then dead-letters the line with its reason)."""
    try:
        obj = json.loads(line.decode())
    except ValueError:
        return _Route(None, None, True)
    if not isinstance(obj, dict):
        return _Route(None, None, True)
    model = obj.get("model_id") if isinstance(obj.get("model_id"), str) else None
    # Feedback has none of these; an inference always has latency_ms (or is dead-lettered).
    inference = not {"latency_ms", "prompt", "response"}.isdisjoint(obj)
    try:
        if not inference:
            return _Route(_timestamp(obj["created_at"]), model, False)
        started = _timestamp(obj["started_at"])
        finished = obj.get("finished_at")
        arrival = _timestamp(finished) if finished else started + float(obj["latency_ms"]) / 1000
    except (KeyError, TypeError, ValueError):
        return _Route(None, model, inference)
    return _Route(arrival, model, True, started)


class _Timers:
    """When the worker's window-closing timer (every ``windows.close_interval_s``) would
    find something to do, so a replay ticks only then: after an event takes its model's
    watermark across a pane boundary plus the allowed lateness (a window may close), and
    while a model with open windows has been idle for ``windows.idle_timeout_s``."""

    def __init__(self, pane_s: float, lateness_s: float, idle_s: float) -> None:
        self.pane_s, self.lateness_s, self.idle_s = pane_s, lateness_s, idle_s
        self._boundary: dict[str, float] = {}
        #: Per model that may go idle with windows open: when its next idle tick is due.
        self._idle_at: dict[str, float] = {}

    def saw(self, model: str, started: float | None, now: float) -> bool:
        """Note a model's event; True when a window of it may have become closable."""
        self._idle_at[model] = now + self.idle_s
        if started is None:
            return False
        boundary = self._boundary.get(model)
        if boundary is not None and started < boundary:
            return False
        panes = (started - self.lateness_s) // self.pane_s + 1
        self._boundary[model] = panes * self.pane_s + self.lateness_s
        return boundary is not None

    def next_idle_tick(self) -> float | None:
        return min(self._idle_at.values(), default=None)

    def ticked(self, at: float, interval: float, open_models: set[str]) -> None:
        """After an idle tick: idle models with windows open tick again one interval later;
        the others stop until they return."""
        for model, due in list(self._idle_at.items()):
            if due <= at:
                if model in open_models:
                    self._idle_at[model] = at + interval
                else:
                    del self._idle_at[model]


def _timestamp(text: str) -> float:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("naive timestamp")
    return value.timestamp()


def _ingestor(settings: Settings) -> Any:
    """The worker's :class:`~genmon.streams.ingest.Ingestor`, without an app."""
    from genmon.streams.ingest import Ingestor, IngestSinks
    from genmon.streams.metrics import WorkerMetrics

    app = SimpleNamespace(
        genmon=SimpleNamespace(
            settings=settings,
            metrics=WorkerMetrics(CollectorRegistry()),
            sinks=IngestSinks(),
            topics=SimpleNamespace(deadletter=None),
        )
    )
    return Ingestor(app)


def _sampler(settings: Settings, seed: int) -> Any:
    from genmon.streams.embedding.sampling import Sampler

    return Sampler(settings, rng=random.Random(seed))


def _incident_summary(row: Any) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()

    return {
        "id": row.id,
        "model_id": row.model_id,
        "model_version": row.model_version,
        "signal": row.signal,
        "segment": row.segment,
        "kind": row.kind.value,
        "severity": row.severity.value,
        "status": row.status.value,
        "title": row.title,
        "opened_at": iso(row.opened_at),
        "resolved_at": iso(row.resolved_at),
        "finding_count": row.finding_count,
        "related_to": row.parent_id,
    }
