"""Base of the online embedding drift detectors (sliding window, ERT-calibrated thresholds).

A subclass calibrates per-step thresholds from the reference (``_calibrate``), keeps its
window statistics (``_clear_window``, ``_consume``, ``_window_state``) and inherits the
batch loop: chunks of at most ``_CHUNK`` rows, the first detection in a chunk empties
the window (warm-up restarts) and the rest of the batch continues from there.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any

import numpy as np

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    _to_jsonable,
    check_param,
)
from genmon.detectors.drift._common import (
    as_matrix,
    as_reference,
    check_sigma,
    embedding_streams,
    encode_array,
    needed_bootstraps,
)

_CHUNK = 512  # rows per vectorised step: bounds the per-chunk kernel blocks


class OnlineKernelDrift(Detector):
    """Shared machinery; see :class:`~genmon.detectors.drift.online_mmd.OnlineMMDDrift`."""

    kind = DetectorKind.DRIFT
    _thresholds: np.ndarray

    def _init_online(
        self,
        reference: Any,
        window_size: int,
        ert: float,
        n_bootstraps: int | None,
        sigma: float | None,
        seed: int,
    ) -> None:
        self.window_size = int(window_size)
        check_param("window_size", self.window_size, low=2)
        self.ert = float(ert)
        check_param("ert", self.ert, low=1.0, low_open=True)
        needed = needed_bootstraps(self.ert, self.window_size)
        self.n_bootstraps = max(1000, needed) if n_bootstraps is None else int(n_bootstraps)
        check_param("n_bootstraps", self.n_bootstraps, low=needed)
        self.sigma = check_sigma(sigma)
        self.seed = int(seed)
        self.set_reference(reference)

    def _min_reference_rows(self) -> int:
        return 3 * self.window_size

    def set_reference(self, reference: Any) -> None:
        """Replace the reference (e.g. last week's embeddings), recalibrate and reset.

        Calibration is deterministic given ``seed``, so a detector rebuilt from its
        ``state_dict`` gets the same thresholds.
        """
        self.reference = as_reference(reference, min_rows=self._min_reference_rows())
        self._calibrate()
        self.reset()

    @abc.abstractmethod
    def _calibrate(self) -> None:
        """Set ``_thresholds`` (one per overlapping step) and the live reference statistics."""

    @abc.abstractmethod
    def _clear_window(self) -> None:
        """Empty the window statistics; ``_tested`` counts full windows since then."""

    @abc.abstractmethod
    def _reference_terms(self, chunk: np.ndarray) -> np.ndarray:
        """Per-row terms against the reference (the costly part), one row per chunk row."""

    @abc.abstractmethod
    def _consume(
        self, chunk: np.ndarray, reference_terms: np.ndarray
    ) -> tuple[int, float | None, float]:
        """Advance over ``chunk``: (first detection index or -1, its/last stat, threshold).

        On a detection, state beyond the previous chunk need not be committed: the
        caller empties the window. Otherwise commit and add ``len(chunk)`` to ``_n_seen``.
        """

    @abc.abstractmethod
    def _window_fill(self) -> int: ...

    @abc.abstractmethod
    def _window_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _set_window_state(self, state: dict[str, Any]) -> None: ...

    def _evidence_values(self) -> tuple[tuple[str, float], ...]:
        return ()

    def get_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for pname in inspect.signature(type(self).__init__).parameters:
            if pname == "reference":
                params[pname] = encode_array(self.reference)
            elif pname != "self":
                params[pname] = _to_jsonable(getattr(self, pname))
        return params

    def reset(self) -> None:
        self._clear_window()
        self._n_seen = 0
        self._n_detections = 0

    def update(self, batch: Any) -> DetectorResult:
        x = as_matrix(batch, self.reference.shape[1], f"{type(self).__name__} batch")
        score, threshold = float("nan"), float(self._thresholds[0])
        detections, first, start = 0, -1, 0
        while start < len(x):
            chunk = x[start : start + _CHUNK]
            # The per-row reference terms do not depend on the window: compute them once
            # even when a detection restarts the window mid-chunk.
            reference_terms = self._reference_terms(chunk)
            offset = 0
            while offset < len(chunk):
                hit, stat, thr = self._consume(chunk[offset:], reference_terms[offset:])
                if stat is not None and detections == 0:
                    score, threshold = stat, thr  # the first detection's values, else the last
                if hit < 0:
                    break
                detections += 1
                first = start + offset + hit if first < 0 else first
                self._n_seen += hit + 1
                self._n_detections += 1
                self._clear_window()
                offset += hit + 1
            start += len(chunk)
        return self._result(
            score=score,
            threshold=threshold,
            detected=detections > 0,
            n_seen=self._n_seen,
            evidence=Evidence(
                test=self.name,
                values=(
                    ("detections", float(detections)),
                    ("first_detection_index", float(first)),
                    ("window_fill", float(self._window_fill())),
                    *self._evidence_values(),
                ),
            ),
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            **self._window_state(),
            "tested": self._tested,
            "n_seen": self._n_seen,
            "n_detections": self._n_detections,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._set_window_state(state)
        self._tested, self._n_seen = int(state["tested"]), int(state["n_seen"])
        self._n_detections = int(state["n_detections"])

    def _first_detection(
        self, stat: np.ndarray, full: np.ndarray
    ) -> tuple[int, float | None, float]:
        """What ``_consume`` reports for a chunk's statistics, before committing anything.

        ``full`` marks the rows whose window is full; each is tested against the threshold
        of its step since the restart.
        """
        steps = self._tested + np.cumsum(full) - 1
        thr = self._thresholds[np.clip(steps, 0, self.window_size - 1)]
        hits = np.flatnonzero(full & (stat > thr))
        last = int(hits[0]) if hits.size else len(stat) - 1
        last_stat = float(stat[last]) if full[last] else None
        return (last if hits.size else -1), last_stat, float(thr[last])


def online_example(
    cls: Any, constant: float | None, invalid: tuple[dict[str, Any], ...], **params: Any
) -> ContractExample:
    """A contract example for the online tests: 3-d standard normal, then a +3 shift."""
    stream, shifted = embedding_streams(constant, 3.0)
    detector = cls(stream(np.random.default_rng(1), 120), **params)
    return ContractExample(detector, stream, shifted, detector.window_size, invalid)
