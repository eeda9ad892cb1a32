"""A model's own baselines: what its rates and latencies look like when it is healthy.

The default detectors judge every version of a model against the *model's* baseline, not
against a fixed limit and not against the version's own past: a new version is compared
with what its predecessors did from its first window, which is what catches a bad deploy.
Baselines are pure data, stored in the model's detector state (JSON) by the runner.

Life of a baseline, in tumbling windows:

1. **Warm-up** (``detectors.baseline_warmup_windows``, 15 by default: minutes): a new
   model's first windows are learned, nothing is judged (silent).
2. **Reference.** The warm-up windows become the reference: the rate (or, for latencies,
   the bucket of the ``detectors.latency_quantile`` of all their requests) and the
   *dispersion* of the windows around it, since real traffic varies more than binomial
   sampling (bursts of long prompts, retries, one busy customer). Both are used at a
   conservative confidence bound: the rate at its upper 95 % bound (Jeffreys), the
   dispersion at its upper 95 % bound (``X2 / chi2_0.05(windows - 1)``), so a short
   reference errs towards silence rather than pages. The excess may be constant per
   request or grow with the window (a beta-binomial intra-window correlation): a window
   is judged with the larger of the two, so a busy peak is covered as well as a quiet night.
3. **Healthy windows only.** Later windows are learned into a *candidate* only when the
   runner says they were healthy (the version's test is not firing and has not built up
   half its threshold). A young reference grows by merging a candidate as large as itself
   (15, 30, 60, ... windows); once it holds ``detectors.baseline_refresh_windows`` (a day
   of 60 s windows) a full candidate replaces it. Either way only if the candidate is not
   worse than the reference by half the rise the test is designed to catch; otherwise the
   candidate is dropped and counted in ``refused``: a slow degradation is never learned
   away, it grows until it pages.
4. **Refresh by the clock** (the scheduler's ``reference-refresh``): :meth:`refresh_now`
   replaces the reference by its candidate at once, without waiting for it to fill, once
   the candidate holds ``minimum`` windows (the runner passes the warm-up), under the same
   "not worse" limit; a smaller candidate is left to grow.

:class:`RateBaseline` holds counts (errors of requests, thumbs-down of scored feedback);
:class:`LatencyBaseline` holds DDSketches and turns each window into a count too (the
requests above the reference's quantile bucket), so every default test is the same
binomial CUSUM (:class:`~genmon.detectors.RateCUSUM`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from scipy import stats

from genmon.detectors.sketch import QuantileSketch

#: Confidence of the bounds a reference is used at.
CONFIDENCE = 0.95


#: Windows per block of the batch-means estimate of the long-run dispersion.
BLOCK_WINDOWS = 5


@dataclass
class _Pearson:
    """Counts of windows (or blocks): the pooled rate and the Pearson dispersion
    ``sum (x - n p)^2 / (n p (1 - p)) / (count - 1)``, from four sums."""

    count: int = 0
    events: float = 0.0
    total: float = 0.0
    squares: float = 0.0  # sum of x^2 / n

    def add(self, events: float, total: float) -> None:
        self.count += 1
        self.events += events
        self.total += total
        self.squares += events * events / total

    def plus(self, other: _Pearson) -> _Pearson:
        return _Pearson(
            self.count + other.count,
            self.events + other.events,
            self.total + other.total,
            self.squares + other.squares,
        )

    def pearson(self) -> tuple[float, int]:
        df, p = self.count - 1, self.events / self.total if self.total else 0.0
        if df < 1 or p <= 0.0 or p >= 1.0:
            return 0.0, 0
        return (self.squares - 2 * p * self.events + p * p * self.total) / (p * (1 - p)), df

    def dispersion(self) -> float:
        """Upper 95 % bound of the dispersion (at least 1)."""
        pearson, df = self.pearson()
        if df < 1:
            return 1.0
        return max(1.0, pearson / float(stats.chi2.ppf(1 - CONFIDENCE, df)))


@dataclass
class CountSums:
    """Sufficient statistics of windows of counts, and of blocks of
    :data:`BLOCK_WINDOWS` consecutive windows (batch means).

    Windows give the rate and the dispersion of one window; blocks give the *long-run*
    dispersion a sum over several windows has when traffic regimes last minutes (a burst
    of long prompts, one busy customer): a CUSUM adds windows up, so it must be scaled by
    that, or consecutive windows that are all a little high would page.
    """

    windows: _Pearson = field(default_factory=_Pearson)
    blocks: _Pearson = field(default_factory=_Pearson)
    open: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # x, n, windows

    def add(self, events: int, total: int) -> None:
        if total <= 0:
            return
        self.windows.add(events, total)
        x, n, k = self.open
        x, n, k = x + events, n + total, k + 1
        if k >= BLOCK_WINDOWS:
            self.blocks.add(x, n)
            x, n, k = 0.0, 0.0, 0.0
        self.open = [x, n, k]

    def merged(self, other: CountSums) -> CountSums:
        """Both as one reference (their open blocks are left out)."""
        return CountSums(self.windows.plus(other.windows), self.blocks.plus(other.blocks))

    @property
    def count(self) -> int:
        return self.windows.count

    @property
    def rate(self) -> float:
        w = self.windows
        return w.events / w.total if w.total else 0.0

    def dispersion(self) -> float:
        """Upper 95 % bound of one window's dispersion (at least 1)."""
        return self.windows.dispersion()

    def long_run(self) -> float:
        """Upper 95 % bound of the dispersion of sums over consecutive windows: the larger
        of one window's and one block's (none while fewer than two blocks are known)."""
        return max(self.dispersion(), self.blocks.dispersion())

    def intraclass(self) -> float:
        """Upper 95 % bound of the intra-window correlation ``rho`` of a beta-binomial
        model, where a window of ``n`` varies ``1 + (n - 1) rho`` times more than binomial:
        excess that grows with the window, as a busy hour's bursts do."""
        pearson, df = self.windows.pearson()
        spread = self.windows.total - self.windows.count
        if df < 1 or spread <= 0:
            return 0.0
        bound = pearson * df / float(stats.chi2.ppf(1 - CONFIDENCE, df))
        return max(0.0, bound - df) / spread

    def to_state(self) -> list[float]:
        """Windows' sums, blocks' sums, then the open block: eleven numbers."""
        w, b = self.windows, self.blocks
        sums = [w.count, w.events, w.total, w.squares, b.count, b.events, b.total, b.squares]
        return [*sums, *self.open]

    @classmethod
    def from_state(cls, state: list[float] | None) -> CountSums:
        if not state:
            return cls()
        windows = _Pearson(int(state[0]), float(state[1]), float(state[2]), float(state[3]))
        blocks = _Pearson(int(state[4]), float(state[5]), float(state[6]), float(state[7]))
        return cls(windows, blocks, [float(v) for v in state[8:11]])


def upper_rate(events: float, total: float, dispersion: float) -> float:
    """Upper 95 % Jeffreys bound of a rate, the counts shrunk by the dispersion."""
    if total <= 0:
        return 1.0
    phi = max(dispersion, 1.0)
    return float(stats.beta.ppf(CONFIDENCE, events / phi + 0.5, (total - events) / phi + 0.5))


class Reference(NamedTuple):
    """What a window is judged against."""

    rate: float
    """The rate at its upper bound: the test's null hypothesis."""
    observed: float
    """The reference's own rate (shown to people as the baseline)."""
    dispersion: float
    windows: int
    intraclass: float = 0.0
    long_run: float = 1.0
    """Dispersion of sums over consecutive windows (what a CUSUM adds up)."""

    def dispersion_of(self, n: int) -> float:
        """The dispersion a window of ``n`` is judged with: the larger of the two models
        (excess proportional to ``n``, or growing with it), so a quiet night and a busy
        peak are both covered."""
        return max(self.dispersion, 1.0 + (n - 1) * self.intraclass)


#: ``limit(reference rate) -> the highest candidate rate a refresh accepts``.
AcceptLimit = Callable[[float], float]


class RateBaseline:
    """A model's baseline of one rate (see the module docstring)."""

    def __init__(self, state: dict[str, Any] | None, warmup: int, refresh: int) -> None:
        state = state or {}
        self.warmup, self.refresh = warmup, refresh
        self.ref = CountSums.from_state(state.get("ref"))
        self.cand = CountSums.from_state(state.get("cand"))
        self.ready = bool(state.get("ready", False))
        self.refused = int(state.get("refused", 0))
        cached = state.get("reference")
        self._reference = Reference(*cached) if cached else None

    def reference(self) -> Reference | None:
        """The reference at its bounds (computed when the reference changes, then kept)."""
        if not self.ready:
            return None
        if self._reference is None:
            self._reference = _reference(self.ref, self.ref.windows.events, self.ref.windows.total)
        return self._reference

    def learn(self, events: int, total: int, healthy: bool, limit: AcceptLimit) -> None:
        """Learn one window of one version (only healthy ones once the reference exists)."""
        if not self.ready:
            self.ref.add(events, total)
            self.ready = self.ref.count >= self.warmup
            return
        if not healthy:
            return
        self.cand.add(events, total)
        self._apply(_refresh(self.ref, self.cand, self.refresh, limit))

    def refresh_now(self, minimum: int, limit: AcceptLimit) -> str | None:
        """Replace the reference by the candidate now (a refresh asked for by the clock) if
        it holds ``minimum`` windows and is not worse than ``limit``: ``"replace"``,
        ``"refuse"`` (the candidate is dropped, as a refused refresh's is), or ``None``
        (not ready, or the candidate is too small: nothing changes)."""
        verdict = _forced(self.ref, self.cand, minimum, limit) if self.ready else None
        self._apply(verdict)
        return verdict

    def _apply(self, verdict: str | None) -> None:
        if verdict is None:
            return
        if verdict == "refuse":
            self.refused += 1
        else:
            self.ref = self.ref.merged(self.cand) if verdict == "grow" else self.cand
            self._reference = None
        self.cand = CountSums()

    def to_state(self) -> dict[str, Any]:
        reference = self.reference()
        return {
            "ready": self.ready,
            "ref": self.ref.to_state(),
            "cand": self.cand.to_state(),
            "refused": self.refused,
            "reference": list(reference) if reference is not None else None,
        }


class LatencyBaseline:
    """A model's baseline of one latency: requests above its quantile bucket, as a rate.

    During warm-up the windows' sketches are kept (``warmup`` of them at most); the
    reference is their merge, its key the bucket of ``quantile``, and its dispersion that
    of the warm-up windows' counts above that key. A candidate keeps one merged sketch and
    the counts above the key in force; the key of a refreshed reference comes from its own
    merged sketch.
    """

    def __init__(
        self, state: dict[str, Any] | None, warmup: int, refresh: int, quantile: float
    ) -> None:
        state = state or {}
        self.warmup, self.refresh, self.quantile = warmup, refresh, quantile
        self.warm = [QuantileSketch.from_state(s) for s in state.get("warm", [])]
        self.key: int | None = state.get("key")
        self.ready = bool(state.get("ready", False))
        self.sketch = _sketch(state.get("sketch"))
        self.sums = CountSums.from_state(state.get("sums"))
        self.cand_sketch = _sketch(state.get("cand_sketch"))
        self.cand = CountSums.from_state(state.get("cand"))
        self.refused = int(state.get("refused", 0))
        cached = state.get("reference")
        self._reference = Reference(*cached) if cached else None

    def above(self, window: QuantileSketch) -> tuple[int, int]:
        """``(requests above the reference's quantile bucket, requests)`` of a window."""
        return window.count_above(self.key), window.count

    def reference(self) -> Reference | None:
        """The reference at its bounds (computed when the reference changes, then kept)."""
        if not self.ready or self.sketch is None:
            return None
        if self._reference is None:
            events, total = self.sketch.count_above(self.key), self.sketch.count
            self._reference = _reference(self.sums, events, total)
        return self._reference

    def value(self) -> float | None:
        """The reference's quantile (what people read as "baseline p95")."""
        if self.sketch is None or self.key is None:
            return None
        return self.sketch.key_value(self.key)

    def learn(self, window: QuantileSketch, healthy: bool, limit: AcceptLimit) -> None:
        if window.count == 0:
            return
        if not self.ready:
            self.warm.append(window)
            if len(self.warm) >= self.warmup:
                self._become_reference(self.warm)
                self.warm = []
            return
        if not healthy:
            return
        if self.cand_sketch is None:
            self.cand_sketch = QuantileSketch(window.relative_accuracy)
        self.cand_sketch.merge(window)
        self.cand.add(*self.above(window))
        self._apply(_refresh(self.sums, self.cand, self.refresh, limit))

    def refresh_now(self, minimum: int, limit: AcceptLimit) -> str | None:
        """As :meth:`RateBaseline.refresh_now`: the candidate's sketch becomes the
        reference (its key from its own quantile)."""
        ready = self.ready and self.cand_sketch is not None
        verdict = _forced(self.sums, self.cand, minimum, limit) if ready else None
        self._apply(verdict)
        return verdict

    def _apply(self, verdict: str | None) -> None:
        if verdict is None:
            return
        assert self.cand_sketch is not None
        if verdict == "refuse":
            self.refused += 1
        else:
            grow = verdict == "grow" and self.sketch is not None
            merged = _merge(self.sketch, self.cand_sketch) if grow else self.cand_sketch
            self.sketch, self.key = merged, merged.key_at(self.quantile)
            # The candidate's counts were taken against the old key: their spread stands
            # for the new one's (the same traffic around a nearby quantile).
            self.sums = self.sums.merged(self.cand) if grow else self.cand
            self._reference = None
        self.cand_sketch, self.cand = None, CountSums()

    def _become_reference(self, windows: list[QuantileSketch]) -> None:
        merged = QuantileSketch(windows[0].relative_accuracy)
        for window in windows:
            merged.merge(window)
        self.sketch, self.key = merged, merged.key_at(self.quantile)
        self.sums = CountSums()
        for window in windows:
            self.sums.add(*self.above(window))
        self.ready = True
        self._reference = None

    def to_state(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "warm": [s.to_state() for s in self.warm],
            "key": self.key,
            "sketch": self.sketch.to_state() if self.sketch is not None else None,
            "sums": self.sums.to_state(),
            "cand_sketch": self.cand_sketch.to_state() if self.cand_sketch is not None else None,
            "cand": self.cand.to_state(),
            "refused": self.refused,
            "reference": list(reference) if (reference := self.reference()) else None,
        }


def _refresh(ref: CountSums, cand: CountSums, refresh: int, limit: AcceptLimit) -> str | None:
    """What a candidate does to its reference, the one rule of both baselines: nothing yet
    (``None``) until it holds as many windows as a young reference (or ``refresh``); then
    ``"refuse"`` when its rate is over ``limit`` of the reference's, else ``"grow"`` the
    young reference by it, or ``"replace"`` a grown one."""
    if cand.count < min(ref.count, refresh):
        return None
    if cand.rate > limit(ref.rate):
        return "refuse"
    return "grow" if ref.count < refresh else "replace"


def _forced(ref: CountSums, cand: CountSums, minimum: int, limit: AcceptLimit) -> str | None:
    """A refresh asked for now: ``None`` while the candidate holds fewer than ``minimum``
    windows, ``"refuse"`` when it is worse than ``limit`` allows, else ``"replace"``."""
    if cand.count < max(minimum, 1):
        return None
    return "refuse" if cand.rate > limit(ref.rate) else "replace"


def _reference(sums: CountSums, events: float, total: float) -> Reference:
    """A reference at its bounds: ``events`` of ``total`` (the rate) with the spread of
    ``sums`` (its windows and blocks)."""
    phi = sums.dispersion()
    observed = events / total if total else 0.0
    return Reference(
        upper_rate(events, total, phi),
        observed,
        phi,
        sums.count,
        sums.intraclass(),
        sums.long_run(),
    )


def _sketch(state: dict[str, Any] | None) -> QuantileSketch | None:
    return QuantileSketch.from_state(state) if state else None


def _merge(a: QuantileSketch, b: QuantileSketch) -> QuantileSketch:
    out = QuantileSketch(a.relative_accuracy)
    out.merge(a)
    out.merge(b)
    return out
