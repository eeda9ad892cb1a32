"""Optional alibi-detect backend: its drift detectors behind genmon's detector contract.

alibi-detect is licensed under the Business Source License 1.1 (BSL 1.1) since 0.11.5,
which restricts production use; genmon therefore ships its own detectors
(:mod:`genmon.detectors.drift`) and keeps this backend optional, for comparison and for
users licensed to run alibi-detect. Install it with ``pip install 'genmon[alibi]'``
(alibi-detect 0.13 needs NumPy < 2 and transformers < 5, so it usually lives in its own
virtual environment). Nothing else in genmon imports this module's dependencies;
alibi-detect is imported on first construction.

Randomness (bootstrap calibration, permutation tests) runs under a forked torch RNG
seeded from ``seed``, so a detector rebuilt from its ``state_dict`` recalibrates to the
same thresholds. The state holds the parameters and the reference as base64 arrays
(heavy: N x d floats) plus, for online detectors, alibi's window state (alibi's
per-step history lists are not kept).

>>> AlibiMMDDriftOnline.name, AlibiMMDDriftOnline.requires
('alibi_mmd_online', 'alibi_detect')
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np

from genmon.detectors._base import (
    ContractExample,
    Detector,
    DetectorKind,
    DetectorResult,
    Evidence,
    check_param,
    register,
)
from genmon.detectors.drift._common import (
    as_matrix,
    as_reference,
    check_sigma,
    decode_array,
    embedding_streams,
    encode_array,
)
from genmon.detectors.drift._windowed import EmbeddingDrift, embedding_example
from genmon.detectors.exceptions import InvalidParameterError
from genmon.exceptions import ConfigurationError


def _alibi_cd() -> Any:
    try:
        with warnings.catch_warnings():
            # alibi-detect 0.13 uses torch.jit.script at import time, which torch deprecates.
            warnings.simplefilter("ignore", FutureWarning)
            import alibi_detect.cd as cd
    except ImportError as exc:
        raise ConfigurationError(
            f"the alibi-detect backend needs alibi-detect ({exc}); install it with "
            "`pip install 'genmon[alibi]'` or use genmon.detectors.drift instead"
        ) from exc
    return cd


def _seeded(seed: int, fn: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _configure(seed: int, build: Any, reference: np.ndarray) -> Any:
    if len(np.unique(reference, axis=0)) < 2:
        raise InvalidParameterError(
            "alibi-detect cannot be configured on a reference whose rows are all equal; "
            "use a more varied reference"
        )
    try:
        return _seeded(seed, lambda: build(_alibi_cd()))
    except (ValueError, ZeroDivisionError, RuntimeError) as exc:
        raise InvalidParameterError(
            f"alibi-detect cannot be configured on this reference ({exc}); the usual cause "
            "is a reference without spread (repeated rows): use a more varied reference"
        ) from exc


def _sigma_array(sigma: float | None) -> np.ndarray | None:
    return None if sigma is None else np.array([sigma], dtype=np.float32)


class _AlibiWindowed(EmbeddingDrift):
    """An alibi offline detector run on the last ``window_size`` embeddings."""

    requires: ClassVar[str] = "alibi_detect"

    def _prepare(self) -> None:
        self._alibi = _configure(self.seed, self._build, self.reference)

    def _build(self, cd: Any) -> Any:
        raise NotImplementedError

    def _test(self, window: np.ndarray) -> dict[str, Any]:
        data = _seeded(self.seed + self._n_seen, lambda: self._alibi.predict(window))["data"]
        p_values = np.atleast_1d(np.asarray(data["p_val"], dtype=float))
        distance = np.atleast_1d(np.asarray(data["distance"], dtype=float))
        out = self._p_value_result(float(p_values.min()), float(distance.max()), self.name)
        out["detected"] = bool(data["is_drift"])
        return out

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        return embedding_example(cls, constant, window_size=40, min_samples=30, alpha=0.01)


class _AlibiPermutation(_AlibiWindowed):
    """An alibi two-sample test whose p-value comes from ``n_permutations`` relabellings."""

    _alibi_class: ClassVar[str]

    def __init__(
        self,
        reference: Any,
        window_size: int = 500,
        min_samples: int = 50,
        alpha: float = 0.01,
        n_permutations: int = 200,
        seed: int = 0,
    ) -> None:
        self._set_alpha(alpha)
        self.n_permutations, self.seed = int(n_permutations), int(seed)
        check_param("n_permutations", self.n_permutations, low=int(np.ceil(1 / self.alpha)))
        self._init_window(reference, window_size, min_samples)

    def _build(self, cd: Any) -> Any:
        return getattr(cd, self._alibi_class)(
            self.reference,
            backend="pytorch",
            p_val=self.alpha,
            n_permutations=self.n_permutations,
            device="cpu",
        )


@register
class AlibiMMDDrift(_AlibiPermutation):
    """alibi-detect ``MMDDrift`` (permutation test) on a window; see :class:`MMDDrift`."""

    name = "alibi_mmd"
    _alibi_class = "MMDDrift"


@register
class AlibiLSDDDrift(_AlibiPermutation):
    """alibi-detect ``LSDDDrift`` (least-squares density difference, permutation test)."""

    name = "alibi_lsdd"
    _alibi_class = "LSDDDrift"


@register
class AlibiKSDrift(_AlibiWindowed):
    """alibi-detect ``KSDrift``: per-dimension KS with FDR correction (cf. EmbeddingKSDrift)."""

    name = "alibi_ks"

    def __init__(
        self,
        reference: Any,
        window_size: int = 500,
        min_samples: int = 50,
        alpha: float = 0.01,
        seed: int = 0,
    ) -> None:
        self._set_alpha(alpha)
        self.seed = int(seed)
        self._init_window(reference, window_size, min_samples)

    def _build(self, cd: Any) -> Any:
        return cd.KSDrift(self.reference, p_val=self.alpha, correction="fdr")


class _AlibiOnline(Detector):
    """An alibi online detector fed one embedding at a time; restarts after each alarm."""

    kind = DetectorKind.DRIFT
    requires: ClassVar[str] = "alibi_detect"
    _alibi_class: ClassVar[str]
    _kernel_state: ClassVar[str]

    def __init__(
        self,
        reference: Any,
        window_size: int = 64,
        ert: float = 1000.0,
        n_bootstraps: int = 2000,
        sigma: float | None = None,
        seed: int = 0,
    ) -> None:
        self.window_size, self.ert = int(window_size), float(ert)
        check_param("window_size", self.window_size, low=2)
        check_param("ert", self.ert, low=1.0, low_open=True)
        self.n_bootstraps = int(n_bootstraps)
        # alibi refuses a quantile estimated from fewer than ert bootstrap samples.
        check_param("n_bootstraps", self.n_bootstraps, low=int(np.ceil(2 * self.ert)))
        self.sigma, self.seed = check_sigma(sigma), int(seed)
        self.reference = as_reference(reference, min_rows=3 * self.window_size)
        self._alibi = _configure(self.seed, self._build, self.reference)
        self.reset()

    def _build(self, cd: Any) -> Any:
        return getattr(cd, self._alibi_class)(
            self.reference,
            ert=self.ert,
            window_size=self.window_size,
            backend="pytorch",
            n_bootstraps=self.n_bootstraps,
            sigma=_sigma_array(self.sigma),
            device="cpu",
            verbose=False,
        )

    def get_params(self) -> dict[str, Any]:
        params = {k: getattr(self, k) for k in ("window_size", "ert", "n_bootstraps", "sigma")}
        return {"reference": encode_array(self.reference), **params, "seed": self.seed}

    def reset(self) -> None:
        self._alibi.reset_state()
        self._n_seen = 0
        self._n_detections = 0

    def update(self, batch: Any) -> DetectorResult:
        x = as_matrix(batch, self.reference.shape[1], f"{type(self).__name__} batch")
        detections, first, data = 0, -1, None
        for i, row in enumerate(x):
            data = self._alibi.predict(row)["data"]
            self._n_seen += 1
            if data["is_drift"]:
                detections += 1
                first = i if first < 0 else first
                self._alibi.reset_state()
        self._n_detections += detections
        assert data is not None  # as_matrix refuses empty batches
        return self._result(
            score=float(data["test_stat"]),
            threshold=float(data["threshold"]),
            detected=detections > 0,
            n_seen=self._n_seen,
            evidence=Evidence(
                test=self.name,
                values=(("detections", float(detections)), ("first_detection_index", float(first))),
            ),
        )

    def _get_state(self) -> dict[str, Any]:
        detector = self._alibi._detector
        return {
            "t": int(detector.t),
            "test_window": encode_array(detector.test_window.numpy()),
            "kernel": encode_array(getattr(detector, self._kernel_state).numpy()),
            "n_seen": self._n_seen,
            "n_detections": self._n_detections,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        import torch

        detector = self._alibi._detector
        detector.t = int(state["t"])
        detector.test_window = torch.from_numpy(decode_array(state["test_window"]))
        setattr(detector, self._kernel_state, torch.from_numpy(decode_array(state["kernel"])))
        self._n_seen, self._n_detections = int(state["n_seen"]), int(state["n_detections"])

    @classmethod
    def _contract_example(cls, constant: float | None = None) -> ContractExample:
        stream, shifted = embedding_streams(constant, 3.0)
        reference = stream(np.random.default_rng(1), 60)
        detector = cls(reference, window_size=8, ert=50, n_bootstraps=200)
        # alibi starts with a full window taken from the reference: no warm-up.
        return ContractExample(detector, stream, shifted, 0, ({"window_size": 1},))


@register
class AlibiMMDDriftOnline(_AlibiOnline):
    """alibi-detect ``MMDDriftOnline``; compare :class:`OnlineMMDDrift`."""

    name = "alibi_mmd_online"
    _alibi_class = "MMDDriftOnline"
    _kernel_state = "k_xy"


@register
class AlibiLSDDDriftOnline(_AlibiOnline):
    """alibi-detect ``LSDDDriftOnline`` (least-squares density difference, online)."""

    name = "alibi_lsdd_online"
    _alibi_class = "LSDDDriftOnline"
    _kernel_state = "k_xtc"
