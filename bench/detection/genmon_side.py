"""genmon's side: whatever ``genmon.replay.engine.Replay`` does with the given settings.

The harness does not know how genmon detects (windows, early looks at partial windows,
per-text embedding tests): it replays the stream and reads what came out, so a rerun
measures the code of the day. Two kinds of alarm, both at the replay's clock (event time:
the latest arrival seen when it happened):

- **pages**: the report's triggers (an incident opened or reopened), at the time the
  notification was created, with the incident's signal;
- **findings**: every *detected* finding handed to the incident manager, at the clock of
  the hand-over (read by wrapping the engine's ``manager.process_many``), by signal. They
  are the fallback detection when no page follows the change (see
  :func:`bench.detection.scoring.score`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from genmon.replay.engine import Replay
from genmon.settings import Settings


@dataclass
class GenmonRun:
    """What one replay produced."""

    pages: dict[str, list[float]] = field(default_factory=dict)  # signal -> trigger times
    findings: dict[str, list[float]] = field(default_factory=dict)  # signal -> detected
    titles: list[tuple[float, str, str]] = field(default_factory=list)  # (at, signal, title)
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    events: int = 0


def settings_for(pages_per_week: float | None) -> Settings:
    """Default settings, or with ``detectors.false_pages_per_week`` replaced."""
    settings = Settings()
    if pages_per_week is None:
        return settings
    detectors = settings.detectors.model_copy(update={"false_pages_per_week": pages_per_week})
    return settings.model_copy(update={"detectors": detectors})


def replay(
    chunks: Iterable[list[dict[str, Any]]],
    settings: Settings,
    *,
    embeddings: bool,
    embedding_cache: Path | None,
    seed: int = 0,
) -> GenmonRun:
    """Replay the chunks of events (each in arrival order, one after the other) through
    genmon, as one stream."""
    engine = Replay(settings, embeddings=embeddings, embedding_cache=embedding_cache, seed=seed)
    run = GenmonRun()
    found: dict[str, list[float]] = defaultdict(list)
    handover = engine.manager.process_many

    def recording(findings: Any, *args: Any, **kwargs: Any) -> Any:
        for finding in findings:
            if finding.detected:
                found[finding.signal].append(engine.now)
        return handover(findings, *args, **kwargs)

    engine.manager.process_many = recording
    began = time.perf_counter()
    for events in chunks:
        run.events += len(events)
        engine.feed(json.dumps(e).encode() for e in events)
    report = engine.finish()
    run.seconds = time.perf_counter() - began
    incidents = {i["id"]: i for i in report.incidents}
    pages: dict[str, list[float]] = defaultdict(list)
    for page in report.triggers:
        at = datetime.fromisoformat(page.at).timestamp()
        signal = incidents[page.incident_id]["signal"]
        pages[signal].append(at)
        run.titles.append((at, signal, page.title))
    run.pages = {s: sorted(t) for s, t in pages.items()}
    run.findings = {s: sorted(t) for s, t in found.items()}
    run.counts = dict(report.counts)
    return run
